import sys

from goleash.demo.run import main

sys.exit(main())
