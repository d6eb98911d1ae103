"""``python -m softmerge ...``: the command line (what torchrun runs: ``torchrun ... -m softmerge
merge cfg.yaml``)."""

from softmerge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
