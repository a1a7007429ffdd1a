//! The study as Slurm jobs: time limits, the scripts, bad options; and on a real single-node
//! Slurm cluster started by the test itself (Debian's `slurm-wlm` and `munge`, as root), the
//! smoke study as an array with its merge, and a cancelled task followed by a resubmission.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quant_robust::study::slurm::{scripts, JobOptions, Layout, TimeLimit};

use crate::common::tempdir;
use crate::study::comparable_results as results;

#[test]
fn time_limits_parse_in_slurms_forms() {
    for (s, secs) in [
        ("30", 1800),
        ("30:15", 1815),
        ("2:00:00", 7200),
        ("1-0", 86_400),
        ("1-2", 93_600),
        ("1-2:30", 95_400),
        ("0-00:10:05", 605),
    ] {
        let t: TimeLimit = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(t.seconds(), secs, "{s}");
        // What it writes into the scripts reads back the same.
        assert_eq!(t.to_string().parse::<TimeLimit>().unwrap(), t, "{s}");
    }
    for bad in [
        "",
        "0",
        "1:2:3:4",
        "-5",
        "1-",
        "a",
        "1h",
        "1-2:3:4:5",
        " 5",
        "0:00",
    ] {
        let e = bad.parse::<TimeLimit>().unwrap_err().to_string();
        assert!(e.contains("--time"), "{bad:?}: {e}");
    }
}

fn options() -> JobOptions {
    JobOptions {
        name: "qr-smoke".into(),
        tasks: 3,
        throttle: Some(2),
        partition: Some("gpu".into()),
        time: Some("1:00:00".parse().unwrap()),
        cpus_per_task: 8,
        gres: Some("gpu:1".into()),
        mem: Some("16G".into()),
        end_margin_s: 300,
        requeues: 2,
    }
}

fn layout() -> Layout {
    Layout {
        binary: "/shared/bin/quant-robust".into(),
        workdir: "/shared/work".into(),
        out: "/shared/studies/it's-smoke".into(),
        device: "cuda".into(),
    }
}

#[test]
fn the_scripts_ask_for_what_was_given_and_chain_the_stages() {
    let s = scripts(&options(), &layout(), 2).unwrap();
    for (text, lines) in [
        (
            &s.fp,
            &["#SBATCH --array=1-2", "--fp-only", "#SBATCH --requeue"][..],
        ),
        (&s.grid, &["#SBATCH --array=1-3%2", "#SBATCH --requeue"][..]),
        (&s.merge, &["merge --out"][..]),
    ] {
        for l in lines.iter().chain(&[
            "#SBATCH --time=0-01:00:00",
            "#SBATCH --partition=gpu",
            "#SBATCH --gres=gpu:1",
            "#SBATCH --mem=16G",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --chdir=/shared/work",
            "RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-8}\"",
        ]) {
            assert!(text.contains(l), "{l} missing from\n{text}");
        }
    }
    // The runs stop before the limit, by the margin; a quote in a path stays quoted.
    assert!(
        s.grid.contains(
            "'/shared/bin/quant-robust' reproduce --config '/shared/studies/it'\\''s-smoke/slurm/study.json' --out '/shared/studies/it'\\''s-smoke' --device cuda --time-budget 3300\n"
        ),
        "{}",
        s.grid
    );
    assert!(s.grid.contains("-lt 2 ]"), "{}", s.grid);
    assert!(!s.merge.contains("--array") && !s.merge.contains("--requeue"));
    // Without a time limit there is no budget.
    let s = scripts(
        &JobOptions {
            time: None,
            ..options()
        },
        &layout(),
        2,
    )
    .unwrap();
    assert!(!s.grid.contains("--time") && !s.grid.contains("--time-budget"));
}

#[test]
fn bad_job_options_are_named() {
    let cases: Vec<(JobOptions, &str)> = vec![
        (
            JobOptions {
                tasks: 0,
                ..options()
            },
            "--tasks",
        ),
        (
            JobOptions {
                throttle: Some(0),
                ..options()
            },
            "--throttle",
        ),
        (
            JobOptions {
                cpus_per_task: 0,
                ..options()
            },
            "--cpus",
        ),
        (
            JobOptions {
                partition: Some("gpu\n#SBATCH --x".into()),
                ..options()
            },
            "--partition",
        ),
        (
            JobOptions {
                gres: Some("gpu 1".into()),
                ..options()
            },
            "--gres",
        ),
        (
            JobOptions {
                time: Some("5".parse().unwrap()),
                ..options()
            },
            "leaves no time",
        ),
    ];
    for (o, want) in cases {
        let e = scripts(&o, &layout(), 2).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = scripts(
        &options(),
        &Layout {
            workdir: "/a b".into(),
            ..layout()
        },
        2,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("white space"), "{e}");
}

/// A single-node Slurm cluster on this machine, its daemons children of the test, stopped
/// (by pid) when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian's Slurm and munge where they are missing and this is root with apt-get.
fn install_slurm() -> Result<(), String> {
    if have("slurmctld") && have("slurmd") && have("sbatch") && have("munged") {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root || !have("apt-get") {
        return Err("Slurm is not installed and this is not root with apt-get".into());
    }
    let ok = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge",
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err("apt-get install slurm-wlm munge failed".into())
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn id_of(flag: &str) -> u32 {
    let o = Command::new("id").args([flag, "munge"]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

impl Cluster {
    /// Starts munged (as the munge user), slurmctld and slurmd in the foreground, with a
    /// configuration of this machine's real CPU count and memory; `None` (said on stderr)
    /// where Slurm cannot be installed or started.
    fn start() -> Option<Cluster> {
        if let Err(why) = install_slurm() {
            eprintln!("skipping the real-Slurm test: {why}");
            return None;
        }
        let dir = tempdir();
        let d = dir.path();
        let munge = d.join("munge");
        for sub in ["state", "spool", "log", "munge"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        // munged refuses a world-readable parent: the temp folder is 0700, owned by root.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (uid, gid) = (id_of("-u"), id_of("-g"));
        std::os::unix::fs::chown(&munge, Some(uid), Some(gid)).unwrap();
        let mut daemons = Vec::new();
        let socket = munge.join("munge.sock");
        {
            use std::os::unix::process::CommandExt;
            let child = Command::new("munged")
                .arg("--foreground")
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
                .arg(format!("--log-file={}", munge.join("munged.log").display()))
                .arg(format!("--seed-file={}", munge.join("seed").display()))
                .uid(uid)
                .gid(gid)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            match child {
                Ok(c) => daemons.push(c),
                Err(e) => {
                    eprintln!("skipping the real-Slurm test: munged: {e}");
                    return None;
                }
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
            .to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mem_mb = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            / 1024
            / 2;
        let conf = d.join("slurm.conf");
        let p = |s: &str| d.join(s).display().to_string();
        std::fs::write(
            &conf,
            format!(
                "ClusterName=qrtest\nSlurmctldHost={host}\nAuthType=auth/munge\n\
                 AuthInfo=socket={sock}\nCredType=cred/munge\nSlurmUser=root\nSlurmdUser=root\n\
                 SlurmctldPort={cp}\nSlurmdPort={dp}\nStateSaveLocation={state}\n\
                 SlurmdSpoolDir={spool}\nSlurmctldPidFile={cpid}\nSlurmdPidFile={dpid}\n\
                 SlurmctldLogFile={clog}\nSlurmdLogFile={dlog}\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nReturnToService=2\n\
                 MpiDefault=none\nJobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\nSchedulerType=sched/backfill\n\
                 NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN\n\
                 PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
                sock = socket.display(),
                cp = free_port(),
                dp = free_port(),
                state = p("state"),
                spool = p("spool"),
                cpid = p("slurmctld.pid"),
                dpid = p("slurmd.pid"),
                clog = p("log/slurmctld.log"),
                dlog = p("log/slurmd.log"),
            ),
        )
        .unwrap();
        for (prog, args) in [("slurmctld", &["-D", "-i"][..]), ("slurmd", &["-D"][..])] {
            let c = Command::new(prog)
                .args(args)
                .env("SLURM_CONF", &conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{prog}: {e}"));
            daemons.push(c);
        }
        let cluster = Cluster { dir, daemons };
        let t = Instant::now();
        loop {
            let state = cluster.slurm(&["sinfo", "-h", "-o", "%t"]);
            if state.trim() == "idle" {
                return Some(cluster);
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the cluster did not come up: sinfo says {state:?}; logs in {}",
                cluster.dir.path().join("log").display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// Runs a Slurm client command; its stdout.
    fn slurm(&self, args: &[&str]) -> String {
        let o = Command::new(args[0])
            .args(&args[1..])
            .env("SLURM_CONF", self.conf())
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `quant-robust slurm` for the smoke study into `out` (and `extra` options): the (fp,
    /// grid, merge) job ids.
    fn submit(&self, out: &Path, extra: &[&str]) -> [String; 3] {
        let o = Command::new(env!("CARGO_BIN_EXE_quant-robust"))
            .args(["slurm", "--preset", "smoke", "--tasks", "3", "--cpus", "1"])
            .args(["--device", "cpu", "--out", out.to_str().unwrap()])
            .args(extra)
            .env("SLURM_CONF", self.conf())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .map(String::from)
            .collect();
        ids.try_into()
            .unwrap_or_else(|v| panic!("expected three job ids, got {v:?}\n{err}"))
    }

    /// Waits until none of `jobs` is in the queue any more.
    fn wait_gone(&self, jobs: &[&str], limit: Duration) {
        let t = Instant::now();
        while !self
            .slurm(&["squeue", "-h", "-j", &jobs.join(","), "-o", "%i %T"])
            .trim()
            .is_empty()
        {
            assert!(
                t.elapsed() < limit,
                "jobs {jobs:?} still queued after {limit:?}: {}",
                self.slurm(&["squeue"])
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn logs(out: &Path) -> String {
    let dir = out.join("slurm/logs");
    let mut all = String::new();
    for f in crate::study::walk(&dir) {
        all += &format!(
            "== {}\n{}\n",
            f.display(),
            std::fs::read_to_string(&f).unwrap_or_default()
        );
    }
    all
}

/// On a real Slurm: the smoke study as a full-precision array, a 3-task grid array and a
/// merge, chained with `afterok`, gives exactly the single-process smoke run's results (the
/// pinned golden/smoke-cpu). Then a study whose grid task is cancelled mid-run: Slurm drops
/// the merge, the finished stages stay, and the same submission again finishes the study with
/// the same results. The slow tier (`QR_SLOW=1`) adds jobs too short for their share, which
/// stop at their time budget and requeue themselves until done, with the same results.
#[test]
fn a_real_slurm_runs_the_smoke_study_and_a_cancelled_task_is_finished_by_resubmitting() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let limit = Duration::from_secs(900);
    let golden = results(&Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/smoke-cpu"));

    let work = tempdir();
    let whole = work.path().join("whole");
    let [fp, grid, merge] = cluster.submit(&whole, &[]);
    cluster.wait_gone(&[&fp, &grid, &merge], limit);
    assert!(
        whole.join("results.json").is_file(),
        "no results\n{}",
        logs(&whole)
    );
    assert_eq!(
        results(&whole),
        golden,
        "the Slurm run differs from one process's"
    );
    let all = logs(&whole);
    for shard in [
        "shard 1/3",
        "shard 2/3",
        "shard 3/3",
        "shard 1/2",
        "shard 2/2",
    ] {
        assert!(
            all.contains(&format!("{shard} (from the Slurm array")),
            "{shard}\n{all}"
        );
    }

    // Cancel a grid task once it has finished a stage of its own.
    let cut = work.path().join("cut");
    let [fp, grid, merge] = cluster.submit(&cut, &[]);
    let task = format!("{grid}_2");
    let log = cut.join(format!("slurm/logs/grid-{grid}_2.out"));
    let t = Instant::now();
    while !std::fs::read_to_string(&log)
        .is_ok_and(|l| l.contains("made ") || l.contains("evaluated "))
    {
        assert!(
            t.elapsed() < limit,
            "task {task} never finished a stage\n{}",
            logs(&cut)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.slurm(&["scancel", &task]);
    cluster.wait_gone(&[&fp, &grid, &merge], limit);
    assert!(
        !cut.join("results.json").exists(),
        "the merge ran despite a cancelled task\n{}",
        logs(&cut)
    );
    let kept = crate::study::walk(&cut.join("cache"))
        .into_iter()
        .filter(|f| f.ends_with("record.json"))
        .count();
    assert!(kept > 2, "the finished stages are gone: {kept} records");
    let [fp, grid, merge] = cluster.submit(&cut, &[]);
    cluster.wait_gone(&[&fp, &grid, &merge], limit);
    assert_eq!(
        results(&cut),
        golden,
        "the resubmitted study differs\n{}",
        logs(&cut)
    );
    assert!(
        logs(&cut).contains("read from the cache"),
        "the resubmission recomputed everything"
    );

    // The slow tier: 2-minute jobs whose runs stop 75 s before the limit and requeue
    // themselves (Slurm delays a requeued job by ~2 minutes) until the study is done.
    if std::env::var("QR_SLOW").is_ok_and(|v| v == "1") {
        let short = work.path().join("short");
        let [fp, grid, merge] = cluster.submit(&short, &["--time", "2", "--end-margin", "75"]);
        cluster.wait_gone(&[&fp, &grid, &merge], Duration::from_secs(1800));
        let all = logs(&short);
        assert!(
            all.contains("stopped at the time budget; requeueing"),
            "{all}"
        );
        assert_eq!(results(&short), golden, "the requeued study differs\n{all}");
    }
}
