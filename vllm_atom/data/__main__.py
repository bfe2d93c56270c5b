import sys

from vllm_atom.data.cli import main

sys.exit(main())
