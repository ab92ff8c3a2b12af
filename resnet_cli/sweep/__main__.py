"""`python -m resnet_cli.sweep SWEEP_DIR`: (re)write a sweep's summary."""

from .callback import main

if __name__ == "__main__":
    main()
