"""A trivial recipe for CLI tests: records the config it received and the launch mode."""

from __future__ import annotations

import json
import os


class EchoRecipe:
    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self) -> None:
        pass

    def run_train_validation_loop(self) -> int:
        out = self.cfg.get("echo_file")
        data = self.cfg.to_dict()
        data["_world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        if int(os.environ.get("RANK", "0")) == 0:
            with open(out, "w") as f:
                json.dump(data, f, default=str)
        elif self.cfg.get("fail_other_ranks", None):  # a user error raised on a non-zero rank only
            from nemo_bard.errors import UserError

            raise UserError(self.cfg.get("fail_other_ranks"))
        return 0
