from __future__ import annotations

import sys

from vfmig.cli.main import main

sys.exit(main())
