"""Rewrite an earlier version's decompose tables (eval/, instances/, analysis/, essentiality/) in the one layout.

    python jobs/migrate.py --sweep runs/cifar10_resnets

Versions before 0.2 named them ``<table>/<model>__<split>__<select>[__correct].parquet``; they are
now Hive-partitioned like freq/ and maps/ (``<table>/select_split=…/correct_only=…/split=…/<model>.parquet``,
see ``dtd_ray.io.layout``). The readers refuse the old names with one line naming this command.
"""

from dtd_ray import cli

if __name__ == "__main__":
    cli.main("migrate")  # the same command as `dtd-ray migrate`
