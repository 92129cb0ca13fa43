import sys

from jaxnets.cli import main

sys.exit(main())
