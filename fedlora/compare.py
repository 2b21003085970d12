"""``python -m fedlora.compare RUN_DIR ...``: the entry point of ``fedlora.report.compare``."""

from fedlora.report.compare import main

if __name__ == "__main__":
    main()
