"""vfmig.tui: the terminal dashboard (installed from tui/ as vfmig.tui)."""
