"""Run one ap experiment: `python run.py [group=option ...] [key=value ...]` (see conf/config.yaml and README.md)."""

import os

import hydra
from omegaconf import DictConfig

from ap.config import launch_stamp, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from ap.run import cli_main

    return cli_main(cfg)


if __name__ == "__main__":
    os.environ.setdefault("AP_LAUNCH", launch_stamp())  # run/sweep folder name, shared with its workers and ranks
    main()
