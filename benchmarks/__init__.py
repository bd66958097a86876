"""psrv's benchmarks: each measures psrv and a baseline in the same run and reports ratios (see RESULTS.md)."""
