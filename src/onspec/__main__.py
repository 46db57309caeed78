import sys

from onspec.cli import main

sys.exit(main())
