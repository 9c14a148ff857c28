import sys

from moco.cli import main

sys.exit(main())
