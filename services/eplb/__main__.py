import sys

from services.eplb.cli import main

sys.exit(main())
