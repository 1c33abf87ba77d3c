//! Integration tests: the gateway against real Postgres (started by deploy/services.sh), over real HTTP.

mod addresses;
mod admin;
mod delivery;
mod hardening;
mod https;
mod notify;
mod observability;
mod overload;
mod pooler;
mod process;
mod proxy_protocol;
mod quickstart;
mod refusals;
mod reload;
mod retention;
mod support;
mod tls;
