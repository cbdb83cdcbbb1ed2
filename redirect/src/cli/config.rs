//! The configuration file (`/etc/redirect/redirect.toml`): `redirect run --config FILE` and
//! `redirect config check FILE`.
//!
//! One source of truth for the flags: clap's definition of `run`. The file's keys are `run`'s
//! long flag names (and the global `pin-dir`, `socket` and `journal`), looked up in that
//! definition, never listed again here; so a flag added to `run` is a key at once. A file
//! stands for the argv it spells out (`vip = "10.0.0.1:5432"` is `--vip=10.0.0.1:5432`,
//! `iface = ["eth0", "eth1"]` is `--iface=eth0 --iface=eth1`, `drop-untracked = true` is
//! `--drop-untracked`). Loading it:
//! 1. parse the TOML, keeping each key's span, so every problem names its line;
//! 2. check each value with its flag's own clap value parser (a bad address, duration or
//!    `hook` is reported as `FILE:LINE: ...`, not as a flag the user never typed);
//! 3. append the file's arguments to the command line, leaving out every key the command line
//!    or the environment already gave ([`ArgMatches::value_source`]): the command line wins,
//!    then the environment (a unit's `Environment=`), then the file, then the defaults. A list
//!    given on the command line (`--iface`) replaces the file's list, it does not extend it;
//! 4. let clap parse the whole, which checks what spans keys (required flags, `requires`).
//!
//! Passwords never belong in the file: as on the command line, a DSN with a password is
//! refused, and the keys for secrets are the password *files* (`source-password-file`).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use clap::{Arg, ArgAction, CommandFactory as _, FromArgMatches as _, parser::ValueSource};
use serde::Serialize;
use toml::de::{DeTable, DeValue};

use super::Cli;

/// Arguments of `run` that are not settings: they cannot appear in a file.
/// `once` too: a service that exits after attaching would fail its own start (Type=notify).
const NOT_KEYS: &[&str] = &["config", "help", "version", "once"];

/// Work with the configuration file that `run --config FILE` reads.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file without touching the kernel, the databases or etcd: every
    /// key is a `run` flag, every value parses, the required ones are there, the addresses
    /// and DSNs make sense. Exits non-zero, naming each bad line, if not.
    Check {
        /// The file, e.g. /etc/redirect/redirect.toml.
        file: PathBuf,
        /// Print the verdict (and the settings, or the problems) as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// One problem with a file, at a line when it has one.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub message: String,
}

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| match p.line {
            Some(line) => format!("{}:{line}: {}", path.display(), p.message),
            None => format!("{}: {}", path.display(), p.message),
        })
        .collect();
    lines.join("\n")
}

/// One key of a file, as the arguments it stands for.
#[derive(Debug, Clone)]
struct Setting {
    /// The clap id of the flag (to ask whether the command line gave it).
    id: String,
    args: Vec<OsString>,
}

/// A parsed, value-checked configuration file.
#[derive(Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    settings: Vec<Setting>,
}

/// The command `run` as clap defines it, with the global flags it also takes.
fn run_command() -> clap::Command {
    let mut root = Cli::command();
    root.build();
    root.find_subcommand("run")
        .expect("redirect has a run subcommand")
        .clone()
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        };
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let table = DeTable::parse(text).map_err(|e| {
            invalid(vec![Problem {
                line: e.span().map(|s| line_of(s.start)),
                message: format!("not valid TOML: {}", e.message().trim_end()),
            }])
        })?;
        let run = run_command();
        let mut entries: Vec<_> = table.get_ref().iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        let mut settings = Vec::new();
        let mut problems = Vec::new();
        for (key, value) in entries {
            let line = line_of(key.span().start);
            match setting(&run, key.get_ref(), value.get_ref()) {
                Ok(s) => settings.push(s),
                Err(message) => problems.push(Problem {
                    line: Some(line),
                    message,
                }),
            }
        }
        if problems.is_empty() {
            Ok(Self {
                path: path.to_path_buf(),
                settings,
            })
        } else {
            Err(invalid(problems))
        }
    }

    /// The file's arguments, except those `given` (by the command line or the environment).
    fn args_except(&self, given: impl Fn(&str) -> bool) -> Vec<OsString> {
        self.settings
            .iter()
            .filter(|s| !given(&s.id))
            .flat_map(|s| s.args.iter().cloned())
            .collect()
    }
}

/// The flag a key names, by its long name or an alias.
fn flag<'a>(run: &'a clap::Command, key: &str) -> Option<&'a Arg> {
    run.get_arguments().find(|a| {
        !NOT_KEYS.contains(&a.get_id().as_str())
            && (a.get_long() == Some(key)
                || a.get_all_aliases().is_some_and(|al| al.contains(&key)))
    })
}

fn keys(run: &clap::Command) -> impl Iterator<Item = &str> {
    run.get_arguments()
        .filter(|a| !NOT_KEYS.contains(&a.get_id().as_str()))
        .filter_map(Arg::get_long)
}

/// Turns one `key = value` into the arguments it stands for, or says what is wrong.
fn setting(run: &clap::Command, key: &str, value: &DeValue<'_>) -> Result<Setting, String> {
    if NOT_KEYS.contains(&key) {
        return Err(format!("`{key}` cannot be set in a configuration file"));
    }
    let Some(arg) = flag(run, key) else {
        return Err(unknown_key(run, key));
    };
    let long = arg.get_long().expect("keys are long flags");
    let id = arg.get_id().to_string();
    let flag_arg = |v: &str| OsString::from(format!("--{long}={v}"));
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            DeValue::Boolean(true) => Ok(Setting {
                id,
                args: vec![format!("--{long}").into()],
            }),
            DeValue::Boolean(false) => Ok(Setting { id, args: vec![] }),
            _ => Err(format!(
                "`{key}` is a switch: write `{key} = true` or `{key} = false`"
            )),
        },
        ArgAction::Append => {
            let items: Vec<&DeValue<'_>> = match value {
                DeValue::Array(items) => items.iter().map(toml::Spanned::get_ref).collect(),
                other => vec![other],
            };
            let mut args = Vec::new();
            for item in items {
                let text = scalar(key, item, true)?;
                // A delimited flag (`--etcd a,b`) takes each piece through its parser.
                let pieces: Vec<&str> = match arg.get_value_delimiter() {
                    Some(d) => text.split(d).collect(),
                    None => vec![text.as_str()],
                };
                for piece in pieces {
                    check_value(arg, long, piece)?;
                }
                args.push(flag_arg(&text));
            }
            Ok(Setting { id, args })
        }
        _ => {
            let text = scalar(key, value, false)?;
            check_value(arg, long, &text)?;
            Ok(Setting {
                id,
                args: vec![flag_arg(&text)],
            })
        }
    }
}

/// The text of a string value (bare numbers are refused: `1` could mean 1 s or 1 ms).
fn scalar(key: &str, value: &DeValue<'_>, list: bool) -> Result<String, String> {
    match value {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Array(_) if !list => Err(format!("`{key}` takes one value, not a list")),
        DeValue::Table(_) => Err(format!(
            "`{key}` is not a section: the file has no sections, every key is at the top level"
        )),
        DeValue::Boolean(_) => Err(format!("`{key}` is not a switch: give it a string")),
        other => Err(format!(
            "`{key}` takes a string, in quotes (got the {} {}), e.g. {key} = \"{}\"",
            other.type_str(),
            raw(other),
            raw(other)
        )),
    }
}

fn raw(v: &DeValue<'_>) -> String {
    match v {
        DeValue::Integer(i) => i.as_str().to_owned(),
        DeValue::Float(f) => f.as_str().to_owned(),
        DeValue::Datetime(d) => d.to_string(),
        _ => String::new(),
    }
}

/// Checks `text` with the flag's own value parser (addresses, durations, enums, ranges), alone:
/// a command of just that flag, so neither the required flags nor `requires` get in the way.
fn check_value(arg: &Arg, key: &str, text: &str) -> Result<(), String> {
    let alone = Arg::new(arg.get_id().clone())
        .value_parser(arg.get_value_parser().clone())
        .action(ArgAction::Set);
    clap::Command::new("redirect")
        .no_binary_name(true)
        .arg(alone)
        .try_get_matches_from([text])
        .map(drop)
        .map_err(|e| {
            let message = clap_message(&e).replace(&format!(" for '[{}]'", arg.get_id()), "");
            format!("`{key}`: {message}")
        })
}

/// A clap error's message without its "error: " prefix and "try --help" footer.
fn clap_message(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:")
        })
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "missing required keys: iface, vip" from clap's missing-argument error (its flags are
/// `--iface <IFACES>`: the file's keys are their long names).
fn missing_keys(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    if e.kind() != clap::error::ErrorKind::MissingRequiredArgument {
        return None;
    }
    let Some(ContextValue::Strings(flags)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let keys: Vec<&str> = flags
        .iter()
        .filter_map(|f| f.trim_start_matches("--").split_whitespace().next())
        .collect();
    Some(format!("missing required key(s): {}", keys.join(", ")))
}

fn unknown_key(run: &clap::Command, key: &str) -> String {
    let dashed = key.replace('_', "-");
    let suggestion = keys(run)
        .map(|k| (edit_distance(&dashed, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| format!(": did you mean `{k}`?"));
    suggestion.map_or_else(
        || format!("unknown key `{key}` (the keys are the long flags of `redirect run --help`, without the dashes)"),
        |s| format!("unknown key `{key}`{s}"),
    )
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Parses the process's command line; `run --config FILE` adds the file's settings under the
/// command line's. A bad file ends the process with its problems, as clap does for bad flags.
#[must_use]
pub fn parse_cli() -> Cli {
    let argv: Vec<OsString> = std::env::args_os().collect();
    match parse_from(&argv) {
        Ok(cli) => cli,
        Err(ParseError::Clap(e)) => e.exit(),
        Err(ParseError::Config(e)) => {
            eprintln!("redirect: {e}");
            std::process::exit(2);
        }
    }
}

#[derive(Debug)]
pub enum ParseError {
    Clap(clap::Error),
    Config(ConfigError),
}

/// [`parse_cli`] for a given argv.
pub fn parse_from(argv: &[OsString]) -> Result<Cli, ParseError> {
    // First pass: only to find --config and what the command line gave, so it tolerates what
    // the file may supply (required flags). --help and --version still end here.
    let first = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(argv)
        .map_err(ParseError::Clap)?;
    let file = match first.subcommand() {
        Some(("run", run)) => run.get_one::<PathBuf>("config").cloned(),
        _ => None,
    };
    let Some(file) = file else {
        return Cli::command()
            .try_get_matches_from(argv)
            .and_then(|m| Cli::from_arg_matches(&m))
            .map_err(ParseError::Clap);
    };
    let config = ConfigFile::load(&file).map_err(ParseError::Config)?;
    let run = first.subcommand_matches("run").expect("checked above");
    let given = |id: &str| {
        [&first, run].iter().any(|m| {
            // value_source panics on an id its command does not define.
            m.ids().any(|i| i == id)
                && matches!(
                    m.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
        })
    };
    let mut all = argv.to_vec();
    let extra = config.args_except(given);
    // `run` takes no positionals: its arguments can go at the end, before any `--`.
    let at = all.iter().position(|a| a == "--").unwrap_or(all.len());
    all.splice(at..at, extra);
    let matches = Cli::command().try_get_matches_from(&all).map_err(|e| {
        // The file may be why (a required flag missing from both, a key that needs another):
        // say so, after clap's own message.
        let rendered = e.render().to_string();
        let note = format!(
            "{}\n(the arguments include those from {})\n",
            rendered.trim_end().trim_start_matches("error: "),
            file.display()
        );
        ParseError::Clap(clap::Error::raw(e.kind(), note))
    })?;
    Cli::from_arg_matches(&matches).map_err(ParseError::Clap)
}

/// What `config check --json` prints.
#[derive(Debug, Serialize)]
struct Verdict {
    file: PathBuf,
    ok: bool,
    problems: Vec<Problem>,
    /// The arguments the file stands for (when it parses).
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<Vec<String>>,
}

/// `redirect config check FILE`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let ConfigCommand::Check { file, json } = &args.command;
    let (problems, settings) = match check(file) {
        Ok(file_args) => (Vec::new(), Some(file_args)),
        Err(ConfigError::Invalid { problems, .. }) => (problems, None),
        Err(e @ ConfigError::Read { .. }) => (
            vec![Problem {
                line: None,
                message: e.to_string(),
            }],
            None,
        ),
    };
    let ok = problems.is_empty();
    if *json {
        super::print_json(&Verdict {
            file: file.clone(),
            ok,
            problems: problems.clone(),
            args: settings.map(|a| a.iter().map(|s| s.to_string_lossy().into_owned()).collect()),
        })?;
    } else if ok {
        println!("{}: ok", file.display());
    }
    if !ok {
        anyhow::bail!(
            "{} problem(s) in the configuration file:\n{}",
            problems.len(),
            render(file, &problems)
        );
    }
    Ok(())
}

/// Everything `run --config FILE` would check before touching the kernel, on the file alone.
/// Returns the `run` arguments the file stands for.
pub fn check(file: &Path) -> Result<Vec<OsString>, ConfigError> {
    let config = ConfigFile::load(file)?;
    let invalid = |message: String| ConfigError::Invalid {
        path: file.to_path_buf(),
        problems: vec![Problem {
            line: None,
            message,
        }],
    };
    let file_args = config.args_except(|_| false);
    let mut command_line: Vec<OsString> = vec!["redirect".into(), "run".into()];
    command_line.extend(file_args.iter().cloned());
    let cli = Cli::command()
        .try_get_matches_from(&command_line)
        .and_then(|m| Cli::from_arg_matches(&m))
        .map_err(|e| invalid(missing_keys(&e).unwrap_or_else(|| clap_message(&e))))?;
    let super::Command::Run(run_args) = cli.command else {
        unreachable!("parsed as run")
    };
    super::run::check_settings(&run_args).map_err(|e| invalid(format!("{e:#}")))?;
    Ok(file_args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        match ConfigFile::parse(Path::new("t.toml"), text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn args(text: &str) -> Vec<String> {
        ConfigFile::parse(Path::new("t.toml"), text)
            .unwrap()
            .args_except(|_| false)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn keys_are_run_flags() {
        assert_eq!(
            args(
                "vip = \"10.0.0.1:5432\"\niface = [\"eth0\", \"eth1\"]\ndrop-untracked = true\nno-sysctl = false\npin-dir = \"/x\"\netcd = \"http://a:1,http://b:2\"\n"
            ),
            [
                "--vip=10.0.0.1:5432",
                "--iface=eth0",
                "--iface=eth1",
                "--drop-untracked",
                "--pin-dir=/x",
                "--etcd=http://a:1,http://b:2"
            ]
        );
    }

    #[test]
    fn bad_keys_and_values_name_their_line() {
        let p = problems(
            "# a comment\nvip = \"10.0.0.1\"\nsnat_ports = \"1-2\"\nhook = \"fast\"\ngc-interval = 5\ndrop-untracked = \"yes\"\nconfig = \"x\"\nnonsense = 1\n",
        );
        let lines: Vec<_> = p.iter().map(|p| p.line.unwrap()).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7, 8], "{p:#?}");
        assert!(p[0].message.contains("`vip`"), "{}", p[0].message);
        assert!(
            p[1].message.contains("did you mean `snat-ports`"),
            "{}",
            p[1].message
        );
        assert!(p[2].message.contains("fast"), "{}", p[2].message);
        assert!(p[3].message.contains("in quotes"), "{}", p[3].message);
        assert!(p[4].message.contains("switch"), "{}", p[4].message);
        assert!(
            p[6].message.contains("unknown key `nonsense`"),
            "{}",
            p[6].message
        );
    }

    #[test]
    fn toml_syntax_errors_name_their_line() {
        let p = problems("vip = \"10.0.0.1:5432\"\n\nsource = \"unterminated\n");
        assert_eq!(p[0].line, Some(3), "{p:#?}");
        let p = problems("vip = \"10.0.0.1:5432\"\nvip = \"10.0.0.2:5432\"\n");
        assert_eq!(p[0].line, Some(2), "{p:#?}");
    }

    fn argv(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("redirect-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("redirect.toml");
        std::fs::write(
            &file,
            "iface = [\"eth0\", \"eth1\"]\nvip = \"10.0.0.1:5432\"\nsource = \"10.0.1.1:5432\"\ntarget = \"10.0.2.1:5432\"\ngc-interval = \"3s\"\nsocket = \"/file.sock\"\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let cli = parse_from(&argv(&[
            "redirect",
            "run",
            "--config",
            f,
            "--iface",
            "eth9",
            "--gc-interval",
            "7s",
        ]))
        .unwrap();
        let super::super::Command::Run(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.ifaces, ["eth9"]);
        assert_eq!(args.gc_interval, std::time::Duration::from_secs(7));
        assert_eq!(args.vip.to_string(), "10.0.0.1:5432");
        assert_eq!(cli.socket, PathBuf::from("/file.sock"));
        let cli = parse_from(&argv(&[
            "redirect",
            "--socket",
            "/cli.sock",
            "run",
            "--config",
            f,
        ]))
        .unwrap();
        assert_eq!(cli.socket, PathBuf::from("/cli.sock"));
        // Without the file the required flags are missing.
        assert!(matches!(
            parse_from(&argv(&["redirect", "run", "--iface", "eth0"])),
            Err(ParseError::Clap(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The packaged example (/etc/redirect/redirect.toml) passes `config check`, and shows
    /// every key, so a flag added to `run` must be documented there.
    #[test]
    fn the_example_is_valid_and_complete() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/redirect.toml");
        check(&example).unwrap();
        let text = std::fs::read_to_string(&example).unwrap();
        let run = run_command();
        let missing: Vec<&str> = keys(&run)
            .filter(|k| {
                !text
                    .lines()
                    .any(|l| l.trim_start_matches("# ").starts_with(&format!("{k} = ")))
            })
            .collect();
        assert!(
            missing.is_empty(),
            "packaging/redirect.toml does not show {missing:?}"
        );
    }
}
