"""``python -m insightedit`` is the same as the ``insightedit`` command."""

import sys

from insightedit.cli import main

if __name__ == "__main__":
    sys.exit(main())
