import sys

from awq_serve_cli.main import main

sys.exit(main())
