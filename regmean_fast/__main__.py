import traceback

from . import distributed
from .cli import main

try:
    code = main()
except BaseException as e:  # noqa: BLE001 - under torchrun the exit below must still skip finalisation
    if not distributed._CREATED_GROUP:
        raise
    code = e.code if isinstance(e, SystemExit) else 130 if isinstance(e, KeyboardInterrupt) else 1
    if not isinstance(e, SystemExit):
        traceback.print_exc()
distributed.exit_process(code)
