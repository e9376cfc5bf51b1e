import sys

from ambient_med.cli import main

sys.exit(main())
