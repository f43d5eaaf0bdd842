"""`dsinfer serve` argument parsing and config validation (no model is loaded)."""

import argparse

import pytest

from dsinfer.server.cli import add_serve_parser, cmd_serve, main
from dsinfer.server.config import ServerConfig


def test_serve_subcommand_parses():
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--port", "9001", "--api-key", "k", "--max-num-seqs", "8", "--dtype", "float32"])
    assert (args.func, args.port, args.api_key, args.max_num_seqs, args.dtype) == (cmd_serve, 9001, "k", 8, "float32")
    assert (args.host, args.max_concurrent_requests) == ("127.0.0.1", 512)


@pytest.mark.parametrize("flags, message", [
    (["--max-concurrent-requests", "0"], "max_concurrent_requests"),
    (["--port", "70000"], "port"),
    (["--api-key", " "], "api_key"),
    (["--graceful-shutdown-s", "-1"], "graceful_shutdown_s"),
    (["--model", "/nonexistent/checkpoint"], "nonexistent"),
    (["--no-simulate-qat", "--device", "cpu"], "DeepSeek-V4 checkpoints only"),   # the bundled model is V3-style
])
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    assert main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsinfer: error:") and message in err and "\n" not in err


def test_server_config_defaults_are_valid():
    c = ServerConfig()
    assert (c.host, c.port, c.api_key) == ("127.0.0.1", 8000, None)
