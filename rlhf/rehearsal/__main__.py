import sys

from rlhf.rehearsal.run import main

sys.exit(main())
