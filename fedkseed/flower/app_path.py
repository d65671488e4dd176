"""Where the Flower App folder is installed: what ``flwr run`` takes, from any directory.

The folder (``app/``, holding only the App config ``pyproject.toml``) ships in the wheel as
package data, so after ``pip install 'fedkseed[flower]'`` ::

    flwr run "$(python -m fedkseed.flower.app_path)" <connection> --run-config '...'

finds it without a checkout. Importing this module imports no Flower.
"""

from __future__ import annotations

import pathlib

APP_DIR = pathlib.Path(__file__).resolve().parent / "app"

if __name__ == "__main__":
    print(APP_DIR)
