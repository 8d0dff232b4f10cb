import sys

from env_server.cli import main

sys.exit(main())
