"""``python -m bench``: see bench/README.md."""

import sys

from .snapshot import freeze

freeze()  # before anything imports redflow

from .cli import main  # noqa: E402

sys.exit(main())
