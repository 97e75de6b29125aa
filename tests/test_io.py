"""Spectrum readers: the bundled real DESI coadd, synthetic SDSS spec-lite files, tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from sedvae.io import (
    MissingHDUError,
    SpecFlag,
    Spectra,
    SpectrumFileError,
    desi_filter_names,
    desi_resolution_matrix,
    read_desi_coadd,
    read_sdss_spec,
    read_spectra,
    read_table,
    write_table,
)

DESI_DIR = Path(__file__).resolve().parents[1] / "data" / "desi_example"
COADD = DESI_DIR / "coadd-4-80613-thru20210324.fits"
REDROCK = DESI_DIR / "redrock-4-80613-thru20210324.fits"
TARGETID = 39633345008634465


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def desi() -> Spectra:
    return read_desi_coadd(COADD, REDROCK)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a FITS file through ``edit(hdul)`` (in memory, then written to ``dst``)."""
    with fits.open(src, memmap=False) as hdul:
        edit(hdul)
        hdul.writeto(dst)
    return dst


# --------------------------------------------------------------------------- DESI, real file
def test_desi_pixels_and_wavelength_range_per_arm(desi):
    assert desi.arm_names == ("B", "R", "Z")
    counts = [len(desi.arm_pixels(a)) for a in desi.arm_names]
    assert counts == [2751, 2326, 2881]
    assert desi.n_pixels == sum(counts)
    # This coadd's grids (inside the nominal arm ranges 3600-5930, 5660-7720, 7520-9824 A).
    expected = {"B": (3600.0, 5800.0), "R": (5760.0, 7620.0), "Z": (7520.0, 9824.0)}
    for name, (lo, hi) in expected.items():
        w = desi.wave[desi.arm_pixels(name)]
        assert w[0] == pytest.approx(lo, abs=1e-6) and w[-1] == pytest.approx(hi, abs=1e-6)
        np.testing.assert_allclose(np.diff(w), 0.8, atol=1e-6)  # 0.8 A pixels


def test_desi_pixel_values_equal_the_hdus(desi):
    with fits.open(COADD) as hdul:
        for name in desi.arm_names:
            pix = desi.arm_pixels(name)
            for j in (0, 100, 1234, len(pix) - 1):
                assert desi.flux[0, pix[j]] == hdul[f"{name}_FLUX"].data[0, j]
                assert desi.ivar[0, pix[j]] == hdul[f"{name}_IVAR"].data[0, j]
                assert desi.wave[pix[j]] == hdul[f"{name}_WAVELENGTH"].data[j]
            np.testing.assert_array_equal(desi.mask[0, pix], hdul[f"{name}_MASK"].data[0] != 0)


def test_desi_redshift_and_targetid_from_redrock(desi):
    assert len(desi) == 1
    assert desi.ids.dtype == np.int64 and desi.ids[0] == TARGETID
    assert desi.z[0] == pytest.approx(0.36874, abs=1e-5)
    assert desi.flags[0] == 0 and desi.good[0]
    assert desi.extra["SPECTYPE"][0] == "GALAXY" and desi.extra["ZWARN"][0] == 0
    assert desi.meta["instrument"] == "DESI"


def test_desi_photometry_equals_fibermap(desi):
    with fits.open(COADD) as hdul:
        fm = hdul["FIBERMAP"].data
        assert desi.bands == ("G", "R", "Z", "W1", "W2")
        for k, band in enumerate(desi.bands):
            assert desi.photometry[0, k] == fm[f"FLUX_{band}"][0]
            assert desi.photometry_ivar[0, k] == fm[f"FLUX_IVAR_{band}"][0]
        assert desi.extra["EBV"][0] == fm["EBV"][0]
    # This FIBERMAP has EBV but no MW_TRANSMISSION_* columns.
    assert desi.mw_transmission is None
    assert desi.extra["PHOTSYS"][0] == "N"
    assert desi_filter_names("N")[:3] == ("BASS-g", "BASS-r", "MzLS-z")


def test_desi_resolution_rows_sum_to_one(desi):
    with fits.open(COADD) as hdul:
        for a, name in enumerate(desi.arm_names):
            res = desi.resolution[a]
            assert res.shape == (1, 11, len(desi.arm_pixels(name)))
            np.testing.assert_array_equal(res[0], hdul[f"{name}_RESOLUTION"].data[0])
            assert np.all(np.argmax(res[0], axis=0) == 5)  # peak on the main diagonal
            rows = desi_resolution_matrix(res[0].astype(np.float64)).sum(axis=1)[10:-10]
            assert np.median(np.abs(rows - 1)) < 2e-3
            assert np.all(np.abs(rows - 1) < 0.1)


def test_desi_resolution_matrix_convention():
    diag = np.zeros((3, 4))
    diag[0] = 10.0  # offset +1: element (j - 1, j)
    diag[1] = 1.0
    dense = desi_resolution_matrix(diag).toarray()
    assert dense[0, 1] == 10.0 and dense[1, 0] == 0.0 and np.all(np.diag(dense) == 1.0)


def test_desi_missing_hdu_names_file_and_hdu(tmp_path):
    bad = _rewrite(COADD, tmp_path / "coadd-no-rflux.fits", lambda h: h.pop("R_FLUX"))
    with pytest.raises(MissingHDUError, match="R_FLUX") as err:
        read_desi_coadd(bad, REDROCK)
    assert str(bad) in str(err.value)
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_desi_shape_mismatch_names_hdu(tmp_path):
    def shrink(hdul):
        hdul["R_IVAR"].data = hdul["R_IVAR"].data[:, :-1]

    bad = _rewrite(COADD, tmp_path / "coadd-short-ivar.fits", shrink)
    with pytest.raises(SpectrumFileError, match="R_IVAR") as err:
        read_desi_coadd(bad)
    assert str(bad) in str(err.value)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.fits"):
        read_desi_coadd(tmp_path / "nothing.fits")
    with pytest.raises(FileNotFoundError, match="no-redrock.fits"):
        read_desi_coadd(COADD, tmp_path / "no-redrock.fits")


def test_desi_nan_flux_and_bad_ivar_become_masked(tmp_path):
    def damage(hdul):
        hdul["B_FLUX"].data[0, 10] = np.nan
        hdul["B_IVAR"].data[0, 20] = 0.0
        hdul["R_IVAR"].data[0, 30] = -1.0

    spec = read_desi_coadd(_rewrite(COADD, tmp_path / "coadd-nan.fits", damage), REDROCK)
    b, r = spec.arm_pixels("B"), spec.arm_pixels("R")
    for pix in (b[10], b[20], r[30]):
        assert spec.mask[0, pix] and spec.ivar[0, pix] == 0
    assert np.all(np.isfinite(spec.flux))
    assert spec.flags[0] & SpecFlag.NONFINITE and not spec.flags[0] & SpecFlag.ALL_MASKED
    assert spec.mask.sum() == 3


def test_desi_all_masked_galaxy_is_flagged(tmp_path):
    def blank(hdul):
        for arm in "BRZ":
            hdul[f"{arm}_MASK"].data[:] = 1

    spec = read_desi_coadd(_rewrite(COADD, tmp_path / "coadd-masked.fits", blank), REDROCK)
    assert spec.flags[0] & SpecFlag.ALL_MASKED and not spec.good[0]
    assert np.all(spec.ivar == 0)


def test_desi_redshift_from_array_mapping_or_catalog(tmp_path):
    assert read_desi_coadd(COADD, z=[0.2]).z[0] == 0.2
    assert read_desi_coadd(COADD, z={TARGETID: 0.3}).z[0] == 0.3
    missing = read_desi_coadd(COADD, z={1: 0.3})
    assert missing.flags[0] & SpecFlag.NO_Z_MATCH and missing.flags[0] & SpecFlag.BAD_Z
    cat = tmp_path / "zcat.ecsv"
    Table({"TARGETID": [5, TARGETID], "Z": [0.9, 0.25]}).write(cat)
    assert read_desi_coadd(COADD, z=cat).z[0] == 0.25
    assert np.isnan(read_desi_coadd(COADD).z[0])  # no redshift given: NaN, flagged
    with pytest.raises(ValueError, match="either"):
        read_desi_coadd(COADD, REDROCK, z=0.3)
    with pytest.raises(ValueError, match=r"shape \(1,\)"):
        read_desi_coadd(COADD, z=[0.1, 0.2])


def test_desi_zwarn_and_spectype_flagged_or_dropped():
    rr = Table({"TARGETID": [TARGETID], "Z": [0.4], "ZWARN": [4], "SPECTYPE": ["STAR"]})
    spec = read_desi_coadd(COADD, rr)
    assert spec.flags[0] == SpecFlag.ZWARN | SpecFlag.NOT_GALAXY
    assert spec.good[0]  # warnings, not fatal
    assert len(read_desi_coadd(COADD, rr, zwarn_ok=False)) == 0
    assert len(read_desi_coadd(COADD, rr, galaxies_only=True)) == 0


def test_desi_targetids_subset_and_missing():
    assert read_desi_coadd(COADD, REDROCK, targetids=[TARGETID]).ids[0] == TARGETID
    with pytest.raises(SpectrumFileError, match="FIBERMAP"):
        read_desi_coadd(COADD, targetids=[TARGETID, 42])


def _three_targets(hdul):
    """Turn the one-target coadd into three targets (ids 11, 22, 33), third one all NaN."""
    for hdu in hdul[1:]:
        if hdu.name == "FIBERMAP":
            data = np.repeat(hdu.data, 3)
            data["TARGETID"] = [11, 22, 33]
            hdu.data = data
        elif hdu.is_image and hdu.data.ndim >= 2:
            hdu.data = np.repeat(hdu.data, 3, axis=0)
            if hdu.name.endswith("_FLUX"):
                hdu.data[2] = np.nan


def test_desi_batch_matching_order_and_flags(tmp_path):
    path = _rewrite(COADD, tmp_path / "coadd-three.fits", _three_targets)
    rr = Table({"TARGETID": [33, 11], "Z": [0.5, 0.25], "ZWARN": [0, 0]})
    rr["SPECTYPE"] = ["GALAXY", "GALAXY"]
    spec = read_desi_coadd(path, rr)
    np.testing.assert_array_equal(spec.ids, [11, 22, 33])
    np.testing.assert_array_equal(spec.z[[0, 2]], [0.25, 0.5])
    assert spec.flags[0] == 0
    assert spec.flags[1] == SpecFlag.NO_Z_MATCH | SpecFlag.BAD_Z  # not in the redshift table
    assert spec.flags[2] & SpecFlag.ALL_MASKED and spec.flags[2] & SpecFlag.NONFINITE
    np.testing.assert_array_equal(spec.flux[1], spec.flux[0])
    np.testing.assert_array_equal(spec.good, [True, False, False])

    sub = read_desi_coadd(path, rr, targetids=[33, 11])
    np.testing.assert_array_equal(sub.ids, [33, 11])
    np.testing.assert_array_equal(sub.z, [0.5, 0.25])
    assert sub.resolution[0].shape == (2, 11, 2751)
    np.testing.assert_array_equal(read_desi_coadd(path, z=[0.1, 0.2, 0.3]).z, [0.1, 0.2, 0.3])


def test_not_a_fits_file_raises(tmp_path):
    junk = tmp_path / "junk.fits"
    junk.write_text("not a FITS file")
    with pytest.raises(SpectrumFileError, match="junk.fits"):
        read_desi_coadd(junk)


def test_desi_to_torch_and_split_arms(desi):
    import torch

    t = desi.to_torch()
    assert t["flux"].shape == (1, desi.n_pixels) and t["flux"].dtype == torch.float32
    assert t["wave"].dtype == torch.float64 and t["mask"].dtype == torch.bool
    assert [r.shape[-1] for r in t["resolution"]] == [2751, 2326, 2881]
    arms = desi.split_arms()
    assert list(arms) == ["B", "R", "Z"]
    np.testing.assert_array_equal(arms["R"].flux, desi.flux[:, desi.arm_pixels("R")])
    assert arms["R"].resolution[0].shape == (1, 11, 2326)


def test_read_spectra_dispatches(desi):
    spec = read_spectra("desi", COADD, redrock=REDROCK)
    np.testing.assert_array_equal(spec.flux, desi.flux)
    with pytest.raises(ValueError, match="unknown spectrum kind"):
        read_spectra("manga", COADD)


# --------------------------------------------------------------------------- container
def _toy(rng, n=3, m=50, **kw) -> Spectra:
    fields = dict(
        wave=np.linspace(4000.0, 8000.0, m),
        flux=rng.normal(1.0, 0.1, (n, m)),
        ivar=np.full((n, m), 100.0),
        z=np.full(n, 0.1),
        ids=np.arange(n),
    )
    fields.update(kw)
    return Spectra(**fields)


def test_validate_masks_bad_pixels_and_flags_galaxies(rng):
    flux = rng.normal(1.0, 0.1, (3, 50))
    ivar = np.full((3, 50), 100.0)
    flux[0, 3] = np.nan
    ivar[0, 4] = np.inf
    ivar[0, 5] = -2.0
    ivar[1] = 0.0  # galaxy 1: nothing usable
    z = np.array([0.1, 0.2, 5.0])  # galaxy 2: z outside the supported range
    flux_in = flux.copy()
    spec = _toy(rng, flux=flux, ivar=ivar, z=z).validate()
    np.testing.assert_array_equal(np.flatnonzero(spec.mask[0]), [3, 4, 5])
    assert np.all(spec.ivar[spec.mask] == 0) and np.all(np.isfinite(spec.flux))
    assert spec.flags[0] == SpecFlag.NONFINITE
    assert spec.flags[1] == SpecFlag.ALL_MASKED
    assert spec.flags[2] == SpecFlag.BAD_Z
    np.testing.assert_array_equal(spec.good, [True, False, False])
    assert SpecFlag.describe(spec.flags[1]) == "ALL_MASKED"
    np.testing.assert_array_equal(flux, flux_in)  # the caller's arrays are left alone


def test_validate_strict_raises_for_single_galaxy(rng):
    spec = _toy(rng, n=1, ivar=np.zeros((1, 50)), ids=["gal-7"])
    with pytest.raises(ValueError, match="gal-7.*every pixel is masked"):
        spec.validate(strict=True)
    with pytest.raises(ValueError, match="z=nan"):
        _toy(rng, n=1, z=[np.nan]).validate(strict=True)
    _toy(rng, n=1).validate(strict=True)  # a good spectrum passes


def test_shape_mismatch_is_a_clear_value_error(rng):
    with pytest.raises(ValueError, match=r"ivar: expected shape \(3, 50\), got \(3, 49\)"):
        _toy(rng, ivar=np.ones((3, 49)))
    with pytest.raises(ValueError, match="z: expected"):
        _toy(rng, z=[0.1, 0.2])


def test_select_and_concatenate(desi, rng):
    spec = _toy(rng, n=4, extra={"ra": np.arange(4.0)})
    sub = spec.select([2, 0])
    np.testing.assert_array_equal(sub.ids, [2, 0])
    np.testing.assert_array_equal(sub.flux, spec.flux[[2, 0]])
    np.testing.assert_array_equal(sub.extra["ra"], [2.0, 0.0])
    assert len(spec.select(np.array([True, False, True, True]))) == 3
    assert len(spec.select(1)) == 1

    both = Spectra.concatenate([desi, desi.select([0])])
    assert len(both) == 2 and both.resolution[2].shape == (2, 11, 2881)
    np.testing.assert_array_equal(both.photometry[1], desi.photometry[0])
    with pytest.raises(ValueError, match="wavelength grid"):
        Spectra.concatenate([desi, spec])


# --------------------------------------------------------------------------- SDSS, synthetic
def _write_spec_lite(
    path: Path, loglam0: float, m: int, rng, *, z=0.1, cls="GALAXY", zwarning=0, specobj=True
) -> dict:
    """A spec-lite file following the SDSS data model (HDU 1 COADD, HDU 2 SPECOBJ)."""
    loglam = (loglam0 + 1e-4 * np.arange(m)).astype(np.float32)
    flux = (10.0 + rng.normal(0, 1, m)).astype(np.float32)
    ivar = np.full(m, 4.0, np.float32)
    and_mask = np.zeros(m, np.int32)
    and_mask[5] = 1 << 23  # BRIGHTSKY
    wdisp = np.full(m, 1.1, np.float32)
    coadd = fits.BinTableHDU.from_columns(
        [
            fits.Column("flux", "E", array=flux),
            fits.Column("loglam", "E", array=loglam),
            fits.Column("ivar", "E", array=ivar),
            fits.Column("and_mask", "J", array=and_mask),
            fits.Column("or_mask", "J", array=and_mask),
            fits.Column("wdisp", "E", array=wdisp),
            fits.Column("sky", "E", array=np.zeros(m, np.float32)),
            fits.Column("model", "E", array=flux),
        ],
        name="COADD",
    )
    hdus = [fits.PrimaryHDU(), coadd]
    if specobj:
        hdus.append(
            fits.BinTableHDU.from_columns(
                [
                    fits.Column("PLATE", "J", array=[1234]),
                    fits.Column("MJD", "J", array=[52000]),
                    fits.Column("FIBERID", "J", array=[56]),
                    fits.Column("SPECOBJID", "19A", array=["1389310150064195584"]),
                    fits.Column("CLASS", "6A", array=[cls]),
                    fits.Column("Z", "E", array=[z]),
                    fits.Column("ZWARNING", "J", array=[zwarning]),
                ],
                name="SPECOBJ",
            )
        )
    fits.HDUList(hdus).writeto(path)
    return {"loglam": loglam, "flux": flux, "ivar": ivar, "wdisp": wdisp}


def test_sdss_reader_on_synthetic_spec_lite(tmp_path, rng):
    truth = _write_spec_lite(tmp_path / "spec-1234-52000-0056.fits", 3.5800, 200, rng, z=0.12)
    spec = read_sdss_spec(tmp_path / "spec-1234-52000-0056.fits")
    assert spec.flux.shape == (1, 200) and spec.meta["instrument"] == "SDSS"
    np.testing.assert_allclose(spec.wave, 10.0 ** truth["loglam"].astype(np.float64), rtol=1e-6)
    np.testing.assert_array_equal(spec.flux[0], truth["flux"])
    assert spec.mask[0, 5] and spec.ivar[0, 5] == 0 and spec.mask.sum() == 1
    assert spec.z[0] == pytest.approx(0.12) and spec.ids[0] == "1389310150064195584"
    np.testing.assert_allclose(spec.wdisp[0], 1.1)
    np.testing.assert_allclose(spec.lsf_sigma[0], 1.1 * 1e-4 * np.log(10) * spec.wave, rtol=1e-6)
    assert spec.flags[0] == 0


def test_sdss_several_files_share_the_union_lattice(tmp_path, rng):
    a = _write_spec_lite(tmp_path / "a.fits", 3.5800, 100, rng)
    b = _write_spec_lite(tmp_path / "b.fits", 3.5803, 100, rng)  # starts 3 pixels redder
    spec = read_sdss_spec([tmp_path / "a.fits", tmp_path / "b.fits"])
    assert spec.flux.shape == (2, 103)
    np.testing.assert_array_equal(spec.flux[0, :100], a["flux"])
    np.testing.assert_array_equal(spec.flux[1, 3:], b["flux"])
    assert np.all(spec.mask[0, 100:]) and np.all(spec.mask[1, :3])
    np.testing.assert_allclose(np.diff(np.log10(spec.wave)), 1e-4, rtol=1e-9)

    _write_spec_lite(tmp_path / "c.fits", 3.58005, 100, rng)  # half a pixel off the lattice
    with pytest.raises(SpectrumFileError, match="lattice"):
        read_sdss_spec([tmp_path / "a.fits", tmp_path / "c.fits"])


def test_sdss_flags_and_missing_specobj(tmp_path, rng):
    _write_spec_lite(tmp_path / "star.fits", 3.58, 50, rng, cls="STAR", zwarning=4)
    spec = read_sdss_spec(tmp_path / "star.fits")
    assert spec.flags[0] == SpecFlag.NOT_GALAXY | SpecFlag.ZWARN
    _write_spec_lite(tmp_path / "noobj.fits", 3.58, 50, rng, specobj=False)
    with pytest.raises(MissingHDUError, match="SPECOBJ"):
        read_sdss_spec(tmp_path / "noobj.fits")
    spec = read_sdss_spec(tmp_path / "noobj.fits", z=0.05)
    assert spec.z[0] == 0.05 and spec.ids[0] == "noobj"
    assert read_spectra("sdss", tmp_path / "noobj.fits", z=0.05).z[0] == 0.05


# --------------------------------------------------------------------------- tables
@pytest.mark.parametrize("suffix", [".fits", ".ecsv"])
def test_table_round_trip(tmp_path, rng, suffix):
    spec = _toy(
        rng,
        n=3,
        ids=["a", "b", "c"],
        z=[0.1, 0.2, 0.3],
        lsf_sigma=np.full((3, 50), 1.5),
        mask=np.eye(3, 50, dtype=bool),
        meta={"instrument": "toy"},
    ).validate()
    write_table(spec, tmp_path / f"spectra{suffix}")
    back = read_table(tmp_path / f"spectra{suffix}")
    for name in ("wave", "flux", "ivar", "mask", "z", "lsf_sigma", "flags"):
        np.testing.assert_array_equal(getattr(back, name), getattr(spec, name), err_msg=name)
    np.testing.assert_array_equal(back.ids, ["a", "b", "c"])
    assert back.meta["instrument"] == "toy"


def test_table_single_galaxy_csv_and_resolving_power(tmp_path, rng):
    wave = np.linspace(3800.0, 9000.0, 80)
    flux = rng.normal(5.0, 0.5, 80)
    t = Table({"wave": wave, "flux": flux, "ivar": np.full(80, 4.0)})
    t["resolving_power"] = np.full(80, 2000.0)
    t["mask"] = np.arange(80) == 7
    t.write(tmp_path / "one.csv")
    spec = read_table(tmp_path / "one.csv", z=0.05)
    assert spec.flux.shape == (1, 80) and spec.ids[0] == "one"
    np.testing.assert_allclose(spec.flux[0], flux, rtol=1e-6)
    assert spec.mask[0, 7] and spec.mask.sum() == 1 and spec.z[0] == 0.05
    np.testing.assert_allclose(spec.lsf_sigma[0], wave / 2000.0 / 2.3548200450309493, rtol=1e-6)
    assert read_spectra("table", tmp_path / "one.csv").flags[0] & SpecFlag.BAD_Z  # no z


def test_table_empty_csv_cells_become_masked(tmp_path):
    csv = "wave,flux,ivar\n4000,1.0,4\n4001,,4\n4002,2.0,\n4003,3.0,4\n"
    (tmp_path / "holes.csv").write_text(csv)
    spec = read_table(tmp_path / "holes.csv", z=0.1)
    np.testing.assert_array_equal(spec.mask[0], [False, True, True, False])
    np.testing.assert_array_equal(spec.flux[0], [1.0, 0.0, 2.0, 3.0])
    assert spec.flags[0] == SpecFlag.NONFINITE


def test_table_units_are_converted(tmp_path):
    import astropy.units as u

    t = Table(meta={"z": 0.2})
    t["wave"] = np.linspace(400.0, 900.0, 20) * u.nm
    t["flux"] = np.full(20, 3e-17) * u.Unit("erg / (s cm2 Angstrom)")
    t["ivar"] = np.full(20, 1e34) * u.Unit("erg / (s cm2 Angstrom)") ** -2
    t.write(tmp_path / "units.ecsv")
    spec = read_table(tmp_path / "units.ecsv")
    np.testing.assert_allclose(spec.wave, np.linspace(4000.0, 9000.0, 20))
    np.testing.assert_allclose(spec.flux, 3.0, rtol=1e-6)
    np.testing.assert_allclose(spec.ivar, 1.0, rtol=1e-6)
    assert spec.z[0] == pytest.approx(0.2)


def test_table_errors_name_the_column(tmp_path):
    Table({"wave": [1.0, 2.0], "flux": [1.0, 2.0]}).write(tmp_path / "noivar.ecsv")
    with pytest.raises(MissingHDUError, match="'ivar'"):
        read_table(tmp_path / "noivar.ecsv", z=0.1)
    t = Table({"wave": [[1.0, 2.0], [1.0, 3.0]], "flux": np.ones((2, 2)), "ivar": np.ones((2, 2))})
    with pytest.raises(SpectrumFileError, match="different wavelength grids"):
        read_table(t, z=0.1)
