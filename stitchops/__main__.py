import sys

from stitchops.cli import main

sys.exit(main())
