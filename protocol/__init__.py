"""vfmig.protocol: the sans-IO wire protocol (installed from protocol/ as vfmig.protocol)."""
