"""`python -m neuron_explainer.cli` is the `tdb` command."""

import sys

from neuron_explainer.cli import main

sys.exit(main())
