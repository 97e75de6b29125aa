"""Research studies of the SBI head: exact posteriors of mocks, Fisher information of their
binning and summary, fits to the frozen summary, and the choice of embedding. Not part of the
installed package; run from the repository root (``python -m studies.<script>``)."""
