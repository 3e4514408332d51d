import sys

from llmpoold.cli import main

sys.exit(main())
