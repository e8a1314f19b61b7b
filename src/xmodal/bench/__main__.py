"""``python -m xmodal.bench [options]``: the same as ``xmodal bench``."""

import sys

from xmodal.cli.bench import main

sys.exit(main())
