import sys

from saeens.cli import main

sys.exit(main())
