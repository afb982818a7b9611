import sys

from activation_server.main import main

sys.exit(main())
