import sys

from neuroscribe.cli import main

sys.exit(main())
