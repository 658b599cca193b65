"""``python -m unmask.slim CKPT OUT [--fp16]``: a shippable weights-only checkpoint
(``unmask.core.slim``)."""
from unmask.core.slim import main

if __name__ == "__main__":
    raise SystemExit(main())
