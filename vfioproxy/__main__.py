import sys

from vfioproxy.cli import main

sys.exit(main())
