//! The `redirect` binary: parses the command line, sets up logging, and runs a subcommand.
//! Errors end the process with one line on stderr and a non-zero status.

use redirect::cli::{
    Command, completions, config, connections, detach, finish, fix, fleet, flip, history, lag, run,
    status, verify,
};

fn main() {
    // `run --config FILE` reads its settings from the file, under the command line's.
    let cli = config::parse_cli();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REDIRECT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match &cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                let Command::Run(args) = cli.command else {
                    unreachable!()
                };
                rt.block_on(run::run(*args, &cli.pin_dir, &cli.socket, &cli.journal))
            }),
        Command::Flip(a) => flip::run(a, &cli.pin_dir, &cli.socket),
        Command::Lag(a) => lag::run(a, &cli.socket),
        Command::History(a) => history::run(a, &cli.journal),
        Command::Status(a) => status::run(a, &cli.pin_dir, &cli.socket, &cli.journal),
        Command::Connections(a) => connections::run(a, &cli.pin_dir),
        Command::Detach(a) => detach::run(a, &cli.pin_dir, &cli.journal),
        Command::Finish(a) => finish::run(a, &cli.socket),
        Command::Fix(a) => fix::run(a, &cli.socket),
        Command::Fleet(a) => fleet::run(a, &cli.socket),
        Command::Verify(a) => verify::run(a, &cli.socket),
        Command::Config(a) => config::run(a),
        Command::Completions(a) => completions::run(a),
        Command::Manpages(a) => completions::manpages(a),
    };
    if let Err(e) = result {
        eprintln!("redirect: {e:#}");
        std::process::exit(1);
    }
}
