"""`dspark-client`: talk to a dspark-trt Triton deployment.

Exit codes: 0 success · 1 the server answered with an error or is not ready · 2 bad usage ·
4 the server could not be reached.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console

EXIT_NOT_READY = 1
EXIT_UNREACHABLE = 4

stdout = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dspark-trt")
def main() -> None:
    """Client for a DSpark speculative-decoding service on Triton Inference Server.

    \b
    dspark-client health                      # is the server up, which models are ready?
    """


@main.command()
@click.option("--url", default="127.0.0.1:8000", show_default=True, help="Triton HTTP endpoint (host:port).")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for the server.")
def health(url: str, timeout: float) -> None:
    """Check that the server is live and ready, and list its models with their state."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    try:
        live, ready = client.is_server_live(), client.is_server_ready()
        models = client.get_model_repository_index()
    except (InferenceServerException, OSError) as e:
        err.print(f"[red]error:[/] no Triton server reachable at {url} ({e})")
        sys.exit(EXIT_UNREACHABLE)
    stdout.print(f"server {url}: live={live} ready={ready}")
    for model in models:
        stdout.print(f"  {model.get('name')} {model.get('version', '')} {model.get('state', 'UNKNOWN')}")
    if not (live and ready):
        sys.exit(EXIT_NOT_READY)


if __name__ == "__main__":
    main()
