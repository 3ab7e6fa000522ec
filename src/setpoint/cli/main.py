"""`setpoint` command line: serve, demo, config check, keys, sim-provider."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from setpoint.config.compile import Runtime, compile_config
from setpoint.config.load import load_config
from setpoint.config.schema import RootConfig
from setpoint.errors import ConfigError

__all__ = ["main"]


def _compile(path: str | None) -> Runtime:
    if path is None:
        return compile_config(RootConfig())
    return compile_config(load_config(path), base_dir=Path(path).resolve().parent)


def _or_exit(path: str | None) -> Runtime:
    try:
        return _compile(path)
    except ConfigError as err:
        click.echo(f"{path}: invalid config", err=True)
        for line in err.problems:
            click.echo(f"  {line}", err=True)
        sys.exit(2)


@click.group()
@click.version_option(package_name="setpoint")
def main() -> None:
    """setpoint: an OpenAI-compatible LLM gateway that keeps your AI system at its set points."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="setpoint.yaml")
@click.option("--host", default=None, help="override server.host")
@click.option("--port", type=int, default=None, help="override server.port")
@click.option("--workers", type=int, default=None, help="override server.workers")
def serve(config_path: str | None, host: str | None, port: int | None, workers: int | None) -> None:
    """Run the gateway."""
    from setpoint.proxy.server import run_server

    runtime = _or_exit(config_path)
    srv = runtime.config.server
    h, p, w = host or srv.host, srv.port if port is None else port, workers or srv.workers
    if w > 1 and config_path is None:
        click.echo("--workers > 1 needs --config (each worker loads the same file)", err=True)
        sys.exit(2)

    def ready(bound: int) -> None:
        click.echo(f"setpoint listening on http://{h}:{bound}/v1 ({w} worker{'s' if w > 1 else ''}, data in {runtime.data_dir})", err=True)

    run_server(runtime, config_path, h, p, w, on_ready=ready)


@main.group()
def config() -> None:
    """Configuration tools."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate a config file with the same code path as start-up."""
    runtime = _or_exit(path)
    click.echo(
        f"{path}: ok ({len(runtime.providers)} providers, {len(runtime.routes)} models, {len(runtime.static_keys)} keys)"
    )


@main.group()
def keys() -> None:
    """Manage virtual keys (stored hashed in the data dir)."""


def _key_store(config_path: str | None):  # type: ignore[no-untyped-def]
    from setpoint.keys.store import SqliteKeyStore

    runtime = _or_exit(config_path)
    return runtime, SqliteKeyStore(runtime.data_dir / "keys.db")


@keys.command("create")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--name", default="cli", show_default=True)
@click.option("--team", default=None)
@click.option("--user", default=None)
@click.option("--models", default="*", show_default=True, help="comma-separated model aliases, or *")
def keys_create(config_path: str | None, name: str, team: str | None, user: str | None, models: str) -> None:
    """Create a key; the secret is printed once and never stored."""
    runtime, store = _key_store(config_path)
    wanted = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in wanted if m != "*" and m not in runtime.routes]
    if unknown:
        click.echo(f"unknown model(s): {', '.join(unknown)}", err=True)
        sys.exit(2)
    secret, info = store.create(name=name, team=team, user=user, models=None if "*" in wanted else wanted)
    click.echo(f"created key {info.id} (team={info.team or '-'}, models={models})", err=True)
    click.echo(secret)


@keys.command("list")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
def keys_list(config_path: str | None) -> None:
    """List keys (never their secrets)."""
    _, store = _key_store(config_path)
    for k in store.list():
        state = "revoked" if k["revoked"] else "active"
        click.echo(f"{k['id']}  {k['hint']:<12} {state:<8} name={k['name']} team={k['team'] or '-'} models={','.join(k['models'])}")


@keys.command("revoke")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.argument("key_id")
def keys_revoke(config_path: str | None, key_id: str) -> None:
    """Revoke a key by id."""
    _, store = _key_store(config_path)
    if not store.revoke(key_id):
        click.echo(f"no active key with id {key_id}", err=True)
        sys.exit(1)
    click.echo(f"revoked {key_id}")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
@click.option("--by", type=click.Choice(["team", "key", "user", "model", "day"]), default="team", show_default=True)
@click.option("--since", default=None, help="YYYY-MM-DD (UTC)")
@click.option("--until", default=None, help="YYYY-MM-DD (UTC), exclusive")
@click.option("--json", "as_json", is_flag=True, help="print JSON rows")
def usage(config_path: str | None, by: str, since: str | None, until: str | None, as_json: bool) -> None:
    """Spend and tokens from the request log, grouped."""
    import orjson

    from setpoint.errors import InvalidRequestError, StateBackendError
    from setpoint.logstore.backends import open_reader
    from setpoint.logstore.usage import parse_day, usage_report

    runtime = _or_exit(config_path)
    try:
        reader = open_reader(runtime.config.logging, runtime.data_dir)
    except ConfigError as err:
        click.echo(str(err), err=True)
        sys.exit(2)
    try:
        rows = usage_report(reader, by, parse_day(since, "since"), parse_day(until, "until"))
    except InvalidRequestError as err:
        click.echo(err.message, err=True)
        sys.exit(2)
    except StateBackendError as err:  # the log's database cannot be reached
        click.echo(err.message, err=True)
        sys.exit(1)
    finally:
        reader.close()
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    header = (f"{by:<24} {'requests':>9} {'errors':>7} {'prompt tok':>11} {'output tok':>11} {'cached tok':>11} "
              f"{'cost $':>12} {'cache hits':>10} {'saved $':>10}")
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        click.echo(f"{str(r['group'])[:24]:<24} {r['requests']:>9} {r['errors']:>7} {r['prompt_tokens']:>11} "
                   f"{r['completion_tokens']:>11} {r['cached_tokens']:>11} {r['cost_micros'] / 1e6:>12.6f} "
                   f"{r['cache_hits']:>10} {r['saved_micros'] / 1e6:>10.6f}")
    total, saved = sum(r["cost_micros"] for r in rows), sum(r["saved_micros"] for r in rows)
    click.echo(f"\ntotal {total} micro-dollars (${total / 1e6:.6f}); the cache saved {saved} (${saved / 1e6:.6f})")


@main.command("sim-provider")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=9100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ttft-ms", type=float, default=30.0, show_default=True)
@click.option("--per-token-ms", type=float, default=2.0, show_default=True)
@click.option("--fault", "faults", multiple=True, metavar="NAME=P", help="fault probability, e.g. rate_limit=0.1")
def sim_provider(host: str, port: int, seed: int, ttft_ms: float, per_token_ms: float, faults: tuple[str, ...]) -> None:
    """Run the simulated provider as an OpenAI-compatible HTTP server."""
    from aiohttp import web

    from setpoint.config.schema import FaultsConfig, LatencyConfig, SimulatedProviderConfig
    from setpoint.providers.simulated.server import build_sim_app

    try:
        fault_cfg = FaultsConfig(**{k: float(v) for k, v in (f.split("=", 1) for f in faults)})
        cfg = SimulatedProviderConfig(type="simulated", seed=seed, latency=LatencyConfig(ttft_ms=ttft_ms, per_token_ms=per_token_ms), faults=fault_cfg)
    except (ValueError, TypeError) as exc:
        click.echo(f"invalid option: {exc}", err=True)
        sys.exit(2)
    click.echo(f"simulated provider on http://{host}:{port}/v1 (seed {seed})", err=True)
    web.run_app(build_sim_app(cfg), host=host, port=port, print=None, access_log=None)


@main.command()
@click.option("--requests", "n_requests", type=int, default=40, show_default=True, help="requests in the burst")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="keep the demo's data here")
def demo(n_requests: int, data_dir: str | None) -> None:
    """Start a gateway on the simulated provider, send real traffic with the openai SDK, report."""
    from setpoint.cli.demo import run_demo

    run_demo(n_requests, data_dir)


if __name__ == "__main__":  # pragma: no cover
    main()
