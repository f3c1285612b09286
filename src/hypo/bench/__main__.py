"""A child process of `hypo bench`: one variant, one JSON line (`python -m hypo.bench VARIANT SETTINGS_JSON`)."""

import json
import logging
import sys

from hypo.bench.settings import RESULT_PREFIX, BenchSettings
from hypo.bench.variants import run_variant


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    variant, settings_json = argv
    print(RESULT_PREFIX + json.dumps(run_variant(variant, BenchSettings.from_json(settings_json))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:3])
