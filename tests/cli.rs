//! The command line: help, JSON output, and clear errors for bad input.

use std::process::Command;

use crate::common::tempdir;

fn qr(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quant-robust"))
        .args(args)
        .output()
        .expect("run quant-robust");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_commands_and_examples() {
    let (ok, out, _) = qr(&["--help"]);
    assert!(ok);
    for w in ["train", "eval", "Examples:", "--adv pgd"] {
        assert!(out.contains(w), "help lacks {w}: {out}");
    }
}

#[test]
fn bad_inputs_are_clear_errors_not_panics() {
    let dir = tempdir();
    let missing = dir.path().join("missing.tar.gz");
    let (ok, _, err) = qr(&[
        "eval",
        "--checkpoint",
        "x.safetensors",
        "--device",
        "cpu",
        "--data",
        missing.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("missing.tar.gz") && err.contains("no such file"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let (ok, _, err) = qr(&[
        "eval",
        "--checkpoint",
        "nope.safetensors",
        "--device",
        "cpu",
        "--data",
        "embedded",
    ]);
    assert!(!ok);
    assert!(err.contains("nope.safetensors"), "{err}");

    let (ok, _, err) = qr(&["train", "--data", "embedded", "--adv-eps", "8/255"]);
    assert!(!ok);
    assert!(err.contains("--adv pgd"), "{err}");

    let (ok, _, err) = qr(&[
        "train",
        "--data",
        "embedded",
        "--adv",
        "pgd",
        "--adv-eps",
        "8",
    ]);
    assert!(!ok);
    assert!(err.contains("pgd.eps") && err.contains("8/255"), "{err}");

    let (ok, _, err) = qr(&[
        "train",
        "--data",
        "embedded",
        "--fraction",
        "1.5",
        "--epochs",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("fraction") && err.contains("(0, 1]"), "{err}");

    let (ok, _, err) = qr(&["train", "--adv", "pgd", "--adv-step", "2/0"]);
    assert!(!ok);
    assert!(err.contains("divides by zero"), "{err}");

    let (ok, _, err) = qr(&["eval", "--device", "cuda", "--checkpoint", "x"]);
    assert!(!ok);
    assert!(err.contains("device") && !err.contains("panicked"), "{err}");
}

#[test]
fn train_then_eval_writes_json_and_checkpoint() {
    let dir = tempdir();
    let ck = dir.path().join("m.safetensors");
    let out = dir.path().join("train.json");
    let (ok, _, err) = qr(&[
        "train",
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--train-count",
        "64",
        "--batch-size",
        "32",
        "--eval-images",
        "50",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["history"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifest"]["data"]["name"], "cifar10-jpeg-sample");
    assert_eq!(v["manifest"]["seed"], 0);
    assert!(ck.exists() && ck.with_extension("json").exists());

    let (ok, stdout, err) = qr(&[
        "eval",
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--n",
        "100",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["total"], 100);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert_eq!(v["manifest"]["config"]["subset_seed"], 0);

    let (ok, _, err) = qr(&[
        "eval",
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--n",
        "5000",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--n 5000") && err.contains("1000 images"),
        "{err}"
    );
}

#[test]
fn attack_command_rejects_bad_input_clearly() {
    let dir = tempdir();
    let ck = dir.path().join("m.safetensors");
    let (ok, _, err) = qr(&[
        "train",
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--train-count",
        "32",
        "--batch-size",
        "16",
        "--eval-images",
        "20",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--out",
        dir.path().join("t.json").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let ck = ck.to_str().unwrap();
    let base = [
        "attack",
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--checkpoint",
        ck,
    ];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        qr(&args)
    };
    let (ok, _, err) = run(&["--eps=-1/255"]);
    assert!(
        !ok && err.contains("eps") && err.contains("-0.0039"),
        "{err}"
    );
    let (ok, _, err) = run(&["--eps", "8"]);
    assert!(!ok && err.contains("8/255"), "{err}");
    let (ok, _, err) = run(&["--attacks", "pgd,deepfool"]);
    assert!(
        !ok && err.contains("deepfool") && err.contains("unknown"),
        "{err}"
    );
    let (ok, _, err) = run(&["--attacks", "square", "--norm", "l2", "--eps", "0.5"]);
    assert!(!ok && err.contains("square") && err.contains("l2"), "{err}");
    let (ok, _, err) = run(&["--n", "1001"]);
    assert!(
        !ok && err.contains("--n 1001") && err.contains("1000 images"),
        "{err}"
    );
    let (ok, _, err) = run(&["--attacks", "transfer:missing.safetensors"]);
    assert!(!ok && err.contains("missing.safetensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A small valid run writes JSON with the worst case and a PNG.
    let png = dir.path().join("adv.png");
    let out = dir.path().join("a.json");
    let (ok, _, err) = run(&[
        "--attacks",
        "fgsm,pgd",
        "--steps",
        "2",
        "--eps",
        "0,8/255",
        "--n",
        "20",
        "--save-examples",
        png.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let r = &v["report"];
    assert_eq!(r["attacks"].as_array().unwrap().len(), 2);
    assert_eq!(r["worst_case"][0]["correct"], r["clean"]["correct"]);
    assert_eq!(r["attacks"][1]["broken"][1].as_str().unwrap().len(), 20);
    assert!(image::open(&png).is_ok());
}

#[test]
fn ptq_rejects_invalid_bits() {
    for (w, a) in [("0", "8"), ("17", "8"), ("4", "1")] {
        let (ok, _, err) = qr(&[
            "ptq",
            "--data",
            "embedded",
            "--device",
            "cpu",
            "--checkpoint",
            "x.safetensors",
            "--wbits",
            w,
            "--abits",
            a,
        ]);
        assert!(
            !ok && err.contains("bits") && err.contains("2 and 16"),
            "{err}"
        );
    }
}

#[test]
fn a_result_file_may_not_overwrite_the_checkpoint_manifest() {
    let dir = tempdir();
    let ck = dir.path().join("m.safetensors");
    let (ok, _, err) = qr(&[
        "train",
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--out",
        dir.path().join("m.json").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("manifest of the checkpoint"), "{err}");
}

/// `qr` with the exit code.
fn qr_code(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_quant-robust"))
        .args(args)
        .output()
        .expect("run quant-robust");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn reproduce_prints_presets_and_refuses_bad_settings() {
    for p in quant_robust::study::config::PRESETS {
        let (ok, out, err) = qr(&["reproduce", "--preset", p, "--print-config"]);
        assert!(ok, "{err}");
        let c: quant_robust::study::StudyConfig = serde_json::from_str(&out).unwrap();
        assert_eq!(c, quant_robust::study::StudyConfig::preset(p).unwrap());
    }
    let dir = tempdir();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"eval": {"attacks": ["pgd", "cw"]}}"#).unwrap();
    let (ok, _, err) = qr(&["reproduce", "--config", bad.to_str().unwrap()]);
    assert!(
        !ok && err.contains("cw") && err.contains("bad.json"),
        "{err}"
    );
    let (ok, _, err) = qr(&["reproduce", "--preset", "huge"]);
    assert!(!ok && err.contains("huge"), "{err}");
    let (ok, _, err) = qr(&["reproduce", "--shard", "3/2", "--out", "x"]);
    assert!(!ok && err.contains("3/2"), "{err}");
    let (ok, _, err) = qr(&["reproduce", "--time-budget=-1"]);
    assert!(!ok && err.contains("time-budget"), "{err}");
    let (ok, _, err) = qr(&["report", dir.path().to_str().unwrap()]);
    assert!(!ok && err.contains("results.json"), "{err}");
    let (ok, _, err) = qr(&[
        "merge",
        "--out",
        "m",
        dir.path().join("none").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("study.json"), "{err}");
}

/// README's main job, exactly: the smoke study, end to end, on the CPU. It writes the
/// results, the report, the plots and a verdict per finding; stopped early it exits 75 and
/// a second call continues from the cache.
#[test]
fn readme_main_job_reproduces_the_smoke_study() {
    let dir = tempdir();
    let out = dir.path().join("study");
    let o = out.to_str().unwrap();
    let (code, err) = qr_code(&[
        "reproduce",
        "--preset",
        "smoke",
        "--out",
        o,
        "--max-stages",
        "1",
    ]);
    assert_eq!(code, Some(75), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    let t = std::time::Instant::now();
    let (code, err) = qr_code(&["reproduce", "--preset", "smoke", "--out", o]);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(code, Some(0), "{err}");
    eprintln!("smoke study: {secs:.0} s");
    let res: quant_robust::study::StudyResults =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(res.config.name, "smoke");
    assert_eq!(res.findings.len(), 6);
    assert_eq!(
        res.models.len(),
        quant_robust::study::plan::models(&res.config).len()
    );
    assert!(res.manifest.data.as_ref().unwrap().name == "cifar10-jpeg-sample");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Smoke run") && md.contains("| F6 |"), "{md}");
    for p in ["eps.svg", "bits.svg", "fraction.svg"] {
        assert!(out.join("plots").join(p).is_file(), "{p}");
    }
    for v in &res.findings {
        assert!(
            err.contains(&format!("{} ", v.id)),
            "verdict {} not logged",
            v.id
        );
    }
    // The whole pipeline is deterministic on the CPU: the run reproduces the pinned smoke
    // set exactly (every count of every model, every verdict).
    let golden_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/smoke-cpu");
    let golden: quant_robust::study::StudyResults =
        serde_json::from_str(&std::fs::read_to_string(golden_dir.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(
        golden.config, res.config,
        "golden/smoke-cpu was made with another smoke preset"
    );
    for (g, m) in golden.models.iter().zip(&res.models) {
        assert_eq!(g.id, m.id);
        let counts = |x: &quant_robust::study::results::ModelResult| {
            let mut v = vec![x.clean.correct];
            v.extend(x.worst_case.iter().map(|e| e.correct));
            v.extend(
                x.attacks
                    .iter()
                    .flat_map(|a| a.per_eps.iter().map(|e| e.correct)),
            );
            v.extend(x.raw_pgd.iter().flatten().map(|e| e.correct));
            v
        };
        assert_eq!(
            counts(g),
            counts(m),
            "{}: the smoke study no longer reproduces golden/smoke-cpu (if intended, follow golden/README.md's update procedure)",
            m.id
        );
    }
    for (g, v) in golden.findings.iter().zip(&res.findings) {
        assert_eq!(g.status, v.status, "{} moved", v.id);
    }
    // And every number of results.json but the timings, to the last bit.
    assert_eq!(
        crate::study::comparable_results(&out),
        crate::study::comparable_results(&golden_dir),
        "results.json differs from golden/smoke-cpu's beyond timings"
    );
    // `report` redraws from results.json alone.
    std::fs::remove_file(out.join("report.md")).unwrap();
    let (ok, _, err) = qr(&["report", o]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), md);
}

/// The GPU tier's command, run here on the CPU: every golden model agrees with the golden
/// results exactly; a wrong data set is refused.
#[test]
fn golden_check_agrees_with_the_pinned_set() {
    let dir = tempdir();
    let out = dir.path().join("check.json");
    let g = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/smoke-cpu");
    let (ok, _, err) = qr(&[
        "golden",
        "check",
        g,
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["disagreements"], 0);
    assert_eq!(v["comparisons"].as_array().unwrap().len(), 17 * 3);
    if let Some(archive) = crate::common::shipped_archive() {
        let (ok, _, err) = qr(&["golden", "check", g, "--data", archive.to_str().unwrap()]);
        assert!(!ok && err.contains("not the golden study's"), "{err}");
    }
}

/// Without `--data`, and for a study whose data is `default`, the shipped archive is
/// required: where it is not found the run stops and says where it looked (it used to fall
/// back to the 3,000-image sample without a word).
#[test]
fn a_missing_default_archive_is_an_error_not_the_sample() {
    let dir = tempdir();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_quant-robust"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run quant-robust");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [
        &["train", "--device", "cpu", "--epochs", "1"][..],
        &[
            "reproduce",
            "--preset",
            "fast",
            "--device",
            "cpu",
            "--max-stages",
            "1",
        ][..],
    ] {
        let (ok, err) = run(args);
        assert!(!ok, "{args:?} ran without data");
        assert!(
            err.contains("shipped archive")
                && err.contains("embedded")
                && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "a failed run left files behind"
    );
}

/// SIGTERM (what Slurm sends first) stops `train` at the next epoch boundary with exit
/// status 75 and a resume point; `train --resume` then finishes the run.
#[test]
fn sigterm_stops_training_cleanly_and_resumably() {
    let dir = tempdir();
    let ck = dir.path().join("m.safetensors");
    let ck_s = ck.to_str().unwrap();
    let args = strings(&[
        "train",
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--train-count",
        "128",
        "--batch-size",
        "64",
        "--eval-images",
        "50",
        "--epochs",
        "200",
        "--checkpoint",
        ck_s,
    ]);
    let resume = dir.path().join("m.train.safetensors");
    let status = sigterm_once(&args, || resume.is_file(), "no epoch finished");
    assert_eq!(status.code(), Some(75), "{status:?}");
    let state = quant_robust::train::Trainer::read_state(&ck).expect("a resume point");
    assert!(
        state.epoch >= 1 && state.epoch < 200,
        "epoch {}",
        state.epoch
    );
    let next = (state.epoch + 1).to_string();
    let (ok, _, err) = qr(&[
        "train",
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--train-count",
        "128",
        "--resume",
        ck_s,
        "--epochs",
        &next,
    ]);
    assert!(ok, "{err}");
    let done = quant_robust::train::Trainer::read_state(&ck).expect("state");
    assert_eq!(done.epoch, state.epoch + 1);
}

/// Runs `fresh` (or `resume` once `resume_file` exists) again and again, SIGKILLing the
/// first four runs at seeded moments within 80% of `full_ms`, until one finishes; after every
/// run, each file that `whole` lists and that exists must read as a complete file (see
/// [`assert_whole`]). Returns the number of kills that landed.
fn kill_until_done(
    fresh: &[String],
    resume: &[String],
    resume_file: &std::path::Path,
    whole: &dyn Fn() -> Vec<std::path::PathBuf>,
    full_ms: u64,
    rng: &mut quant_robust::rng::Rng,
) -> usize {
    let mut kills = 0;
    for attempt in 0..12 {
        let a = if resume_file.is_file() { resume } else { fresh };
        let mut child = Command::new(env!("CARGO_BIN_EXE_quant-robust"))
            .args(a)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if attempt < 4 {
            let delay = (rng.uniform_f32() as f64 * full_ms as f64 * 0.8) as u64 + 20;
            std::thread::sleep(std::time::Duration::from_millis(delay));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                kills += 1;
            }
        }
        let status = child.wait().unwrap();
        for f in whole() {
            if f.is_file() {
                assert_whole(&f);
            }
        }
        if status.success() {
            return kills;
        }
    }
    panic!("never finished: {fresh:?}");
}

/// A safetensors file must load, a JSON file must parse: a file under its real name is never
/// half-written.
fn assert_whole(f: &std::path::Path) {
    match f.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => {
            quant_robust::model::checkpoint::read_safetensors(f)
                .unwrap_or_else(|e| panic!("{} is not whole: {e}", f.display()));
        }
        Some("json") => {
            let s = std::fs::read_to_string(f).unwrap();
            serde_json::from_str::<serde_json::Value>(&s)
                .unwrap_or_else(|e| panic!("{} is not whole: {e}", f.display()));
        }
        _ => {}
    }
}

/// Runs a command to the end and returns its wall milliseconds.
fn run_ms(args: &[String]) -> u64 {
    let t = std::time::Instant::now();
    let st = Command::new(env!("CARGO_BIN_EXE_quant-robust"))
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{args:?}");
    t.elapsed().as_millis() as u64
}

fn same_tensors(a: &std::path::Path, b: &std::path::Path, what: &str) {
    let (a, b) = (
        quant_robust::model::checkpoint::read_safetensors(a).unwrap(),
        quant_robust::model::checkpoint::read_safetensors(b).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let f64s = |t: &candle_core::Tensor| {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    for (name, t) in &a {
        assert_eq!(
            f64s(t),
            f64s(&b[name]),
            "{what}: {name} differs from the uninterrupted run"
        );
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Kill-and-resume trials of `cmd`: an uninterrupted `fresh(m.safetensors)` first, then per
/// trial [`kill_until_done`] in a new folder, continuing with `cmd COMMON --resume
/// m.safetensors` once `resume_file` (in that folder) exists; the final model must equal the
/// uninterrupted one. `also_whole` names more files that must be whole after every kill.
/// Returns the kills that landed.
fn kill_trials(
    cmd: &str,
    common: &[String],
    fresh: &dyn Fn(&str) -> Vec<String>,
    resume_file: &str,
    also_whole: &[&str],
    trials: usize,
    seed: u64,
) -> usize {
    let whole = tempdir();
    let ck_whole = whole.path().join("m.safetensors");
    let full_ms = run_ms(&fresh(ck_whole.to_str().unwrap()));
    let mut rng = quant_robust::rng::Rng::new(seed, "kill-points");
    let mut kills = 0;
    for trial in 0..trials {
        let dir = tempdir();
        let ck = dir.path().join("m.safetensors");
        let ck_s = ck.to_str().unwrap();
        let resume = dir.path().join(resume_file);
        let mut files = vec![ck.clone(), resume.clone()];
        files.extend(also_whole.iter().map(|f| dir.path().join(f)));
        let mut again = strings(&[cmd]);
        again.extend(common.iter().cloned());
        again.extend(strings(&["--resume", ck_s]));
        kills += kill_until_done(
            &fresh(ck_s),
            &again,
            &resume,
            &|| files.clone(),
            full_ms,
            &mut rng,
        );
        same_tensors(&ck_whole, &ck, &format!("{cmd} trial {trial}"));
    }
    kills
}

/// The options every kill test's runs share: the embedded sample, 128 training images.
fn small_run() -> Vec<String> {
    strings(&[
        "--data",
        "embedded",
        "--device",
        "cpu",
        "--train-count",
        "128",
    ])
}

/// SIGKILL at seeded moments of a real `train` process (mid-epoch, between epochs, during a
/// checkpoint write: wherever the delay lands), each time continued with `train --resume`
/// (or started again when no epoch had finished): the final weights equal an uninterrupted
/// run's, bit for bit, and every file under its real name is whole.
#[test]
fn sigkill_at_seeded_points_then_resume_gives_the_same_weights() {
    let fresh = |ck: &str| {
        let mut v = strings(&["train"]);
        v.extend(small_run());
        v.extend(strings(&[
            "--batch-size",
            "32",
            "--eval-images",
            "50",
            "--epochs",
            "3",
            "--checkpoint",
            ck,
        ]));
        v
    };
    let kills = kill_trials(
        "train",
        &small_run(),
        &fresh,
        "m.train.safetensors",
        &[],
        3,
        0,
    );
    assert!(kills >= 6, "only {kills} kills landed");
}

/// The same for `qat` with adversarial training inside (W4A4 from a natural checkpoint):
/// killed at seeded moments, resumed with `qat --resume`, the quantized model equals an
/// uninterrupted run's bit for bit.
#[test]
fn sigkill_during_qat_with_at_then_resume_gives_the_same_model() {
    qat_kill_trials(true, 1);
}

/// The same for plain `qat` (no adversarial training).
#[test]
fn sigkill_during_qat_then_resume_gives_the_same_model() {
    qat_kill_trials(false, 3);
}

/// Kill-and-resume trials of `qat` W4A4 from a natural checkpoint trained here, with or
/// without PGD-AT inside.
fn qat_kill_trials(adversarial: bool, seed: u64) {
    let dir = tempdir();
    let fp = dir.path().join("fp.safetensors");
    let mut train = strings(&["train"]);
    train.extend(small_run());
    train.extend(strings(&[
        "--batch-size",
        "32",
        "--eval-images",
        "50",
        "--epochs",
        "1",
        "--checkpoint",
        fp.to_str().unwrap(),
    ]));
    run_ms(&train);
    let init = format!("natural:{}", fp.display());
    // The per-epoch PGD check on 10 images only: this test is about the kills.
    let cfg = dir.path().join("train.json");
    std::fs::write(&cfg, r#"{"eval_adv_images": 10}"#).unwrap();
    let fresh = |ck: &str| {
        let mut v = strings(&["qat", "--init", &init]);
        v.extend(small_run());
        v.extend(strings(&[
            "--batch-size",
            "32",
            "--eval-images",
            "50",
            "--epochs",
            "3",
            "--config",
            cfg.to_str().unwrap(),
            "--checkpoint",
            ck,
        ]));
        if adversarial {
            v.extend(strings(&["--adv", "pgd", "--adv-steps", "2"]));
        }
        v
    };
    let kills = kill_trials(
        "qat",
        &small_run(),
        &fresh,
        "m.latent.train.safetensors",
        &["m.latent.safetensors"],
        1,
        seed,
    );
    assert!(kills >= 1, "no kill landed");
}

/// Writes the tests' tiny study configuration into `dir` and returns its path.
fn tiny_study_config(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("tiny.json");
    std::fs::write(&cfg, serde_json::to_string(&crate::study::tiny()).unwrap()).unwrap();
    cfg
}

/// `reproduce --config CFG --device cpu --out OUT`.
fn reproduce_args(cfg: &std::path::Path, out: &std::path::Path) -> Vec<String> {
    strings(&[
        "reproduce",
        "--config",
        cfg.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ])
}

/// A finished study's `results.json` without what legitimately differs between runs.
fn stripped_results(out: &std::path::Path) -> serde_json::Value {
    let s = std::fs::read_to_string(out.join("results.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&s).unwrap();
    crate::study::strip(&mut v);
    v
}

/// Runs the binary with `args`, sends it one SIGTERM as soon as `ready` holds (within 300 s, or
/// the test fails saying `never`), and returns how it ended.
fn sigterm_once(
    args: &[String],
    ready: impl Fn() -> bool,
    never: &str,
) -> std::process::ExitStatus {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quant-robust"))
        .args(args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the binary");
    let t = std::time::Instant::now();
    while !ready() {
        assert!(t.elapsed().as_secs() < 300, "{never} in 300 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    child.wait().expect("wait")
}

/// SIGTERM during an evaluation stops `reproduce` after the unit in progress (one attack at
/// one ε on one batch) with exit status 75, the finished units kept in the stage's `partial/`
/// folder; the same command reuses them (the manifest says how much time they had cost),
/// removes the folder, and ends with the results of an uninterrupted run.
#[test]
fn sigterm_stops_an_evaluation_between_units_and_the_rerun_reuses_them() {
    let dir = tempdir();
    let cfg = tiny_study_config(dir.path());
    let whole = dir.path().join("whole");
    let (code, err) = qr_code(
        &reproduce_args(&cfg, &whole)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, Some(0), "{err}");
    let out = dir.path().join("study");
    let args = reproduce_args(&cfg, &out);
    let units = || -> Vec<std::path::PathBuf> {
        if !out.join("cache").is_dir() {
            return Vec::new();
        }
        crate::study::walk(&out.join("cache"))
            .into_iter()
            .filter(|f| f.components().any(|c| c.as_os_str() == "partial"))
            .filter(|f| f.extension().is_some_and(|e| e == "json"))
            .collect()
    };
    let status = sigterm_once(&args, || !units().is_empty(), "no unit finished");
    assert_eq!(status.code(), Some(75), "{status:?}");
    let kept = units();
    assert!(!kept.is_empty());
    // The stage whose units are kept is not finished.
    let stage = kept[0]
        .ancestors()
        .find(|p| p.parent().is_some_and(|q| q.ends_with("cache")))
        .unwrap()
        .to_path_buf();
    assert!(!stage.join("record.json").exists(), "{}", stage.display());
    for f in crate::study::walk(&out) {
        assert_whole(&f);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = qr_code(&a);
    assert_eq!(code, Some(0), "{err}");
    assert!(units().is_empty(), "{:?}", units());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stage.join("record.json")).unwrap()).unwrap();
    let timings = record["manifest"]["timings"].as_array().unwrap();
    assert!(
        timings.iter().any(
            |t| t["stage"] == "eval: units of earlier runs" && t["wall_s"].as_f64() > Some(0.0)
        ),
        "{timings:?}"
    );
    assert_eq!(stripped_results(&out), stripped_results(&whole));
}

/// SIGKILL at seeded moments of a real `reproduce` (mid-training, mid-evaluation, during a
/// write: wherever the delay lands), each time followed by the same command again: every
/// file of the study folder under its real name is whole after every kill, and the finished
/// study equals an uninterrupted run's (its results, timings aside, and every model bit for
/// bit).
#[test]
fn sigkill_during_reproduce_then_the_same_command_gives_the_same_study() {
    let dir = tempdir();
    let cfg = tiny_study_config(dir.path());
    let args = |out: &std::path::Path| reproduce_args(&cfg, out);
    let whole = dir.path().join("whole");
    let full_ms = run_ms(&args(&whole));
    let models = |out: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut m: Vec<_> = crate::study::walk(&out.join("cache"))
            .into_iter()
            .filter(|f| f.file_name().is_some_and(|n| n == "model.safetensors"))
            .map(|f| f.strip_prefix(out).unwrap().to_path_buf())
            .collect();
        m.sort();
        m
    };
    let never = dir.path().join("no-resume-file");
    let mut rng = quant_robust::rng::Rng::new(2, "kill-points");
    let mut kills = 0;
    for trial in 0..2 {
        let out = dir.path().join(format!("trial{trial}"));
        let listing = || {
            if out.is_dir() {
                crate::study::walk(&out)
            } else {
                Vec::new()
            }
        };
        let a = args(&out);
        kills += kill_until_done(&a, &a, &never, &listing, full_ms, &mut rng);
        assert_eq!(
            stripped_results(&out),
            stripped_results(&whole),
            "trial {trial}"
        );
        assert_eq!(models(&out), models(&whole), "trial {trial}");
        for m in models(&whole) {
            same_tensors(
                &whole.join(&m),
                &out.join(&m),
                &format!("trial {trial}: {m:?}"),
            );
        }
    }
    // The first kill of each trial lands (a fresh run lasts as long as the uninterrupted
    // one); later ones may find the rerun, which skips the finished stages, already done.
    eprintln!("reproduce: {kills} kills landed");
    assert!(kills >= 2, "only {kills} kills landed");
}

/// A tmpfs mounted for one test (unmounted on drop), or `None` where this process may not
/// mount (not root, or a container without the capability).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, bytes: usize) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn remount(&self, opt: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount {opt}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Copies the files of `src` into `dst` (made), keeping the tree.
fn copy_tree(src: &std::path::Path, dst: &std::path::Path) {
    for f in crate::study::walk(src) {
        let to = dst.join(f.strip_prefix(src).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, &to).unwrap();
    }
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    crate::study::walk(dir)
        .into_iter()
        .map(|f| (f.clone(), std::fs::read(&f).unwrap()))
        .collect()
}

/// A full disk and a read-only output folder: `reproduce` stops with an error that names
/// the file it could not write and the system's reason, exits non-zero without a panic,
/// leaves every finished stage byte for byte as it was and no temporary file behind; once
/// the fault is gone the same command finishes the study with an uninterrupted run's
/// results. Needs a tmpfs (root, as on this project's machines and CI); elsewhere it says
/// that it could not mount and checks nothing.
#[test]
fn a_full_disk_or_a_read_only_folder_is_an_error_and_loses_no_finished_stage() {
    let dir = tempdir();
    let cfg = tiny_study_config(dir.path());
    let reproduce = |out: &std::path::Path, more: &[&str]| {
        let mut a = reproduce_args(&cfg, out);
        a.extend(strings(more));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        qr_code(&a)
    };
    // A study with some finished stages, and the same study finished.
    let part = dir.path().join("part");
    let (code, err) = reproduce(&part, &["--max-stages", "4"]);
    assert_eq!(code, Some(75), "{err}");
    let whole = dir.path().join("whole");
    let (code, err) = reproduce(&whole, &[]);
    assert_eq!(code, Some(0), "{err}");
    let mnt = dir.path().join("mnt");
    let Some(fs) = Tmpfs::mount(&mnt, 256 << 20) else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); full-disk and read-only not checked"
        );
        return;
    };
    for fault in ["full", "read-only"] {
        let out = mnt.join(fault);
        copy_tree(&part, &out);
        let before = snapshot(&out);
        let filler = mnt.join("filler");
        match fault {
            "full" => {
                // Fill the tmpfs but for 600 kB: the small files fit, the next model
                // checkpoint (1.1 MB) runs out of space half-way.
                use std::io::Write;
                let mut f = std::fs::File::create(&filler).unwrap();
                let block = vec![0u8; 1 << 20];
                while f.write_all(&block).is_ok() {}
                while f.write_all(&block[..4096]).is_ok() {}
                let len = f.metadata().unwrap().len();
                f.set_len(len - 600_000).unwrap();
            }
            _ => fs.remount("ro"),
        }
        let (code, err) = reproduce(&out, &[]);
        let reason = match fault {
            "full" => "No space left on device",
            _ => "Read-only file system",
        };
        assert_eq!(code, Some(1), "{fault}: {err}");
        assert!(
            err.contains(out.to_str().unwrap()) && err.contains(reason),
            "{fault}: the error should name the file and the reason: {err}"
        );
        assert!(!err.contains("panicked"), "{fault}: {err}");
        match fault {
            "full" => std::fs::remove_file(&filler).unwrap(),
            _ => fs.remount("rw"),
        }
        let after = snapshot(&out);
        for (f, bytes) in &before {
            assert!(
                after.get(f) == Some(bytes),
                "{fault}: {} changed",
                f.display()
            );
        }
        let extra: Vec<_> = after.keys().filter(|f| !before.contains_key(*f)).collect();
        assert!(
            extra
                .iter()
                .all(|f| f.ends_with(".lock") || !f.to_string_lossy().ends_with(".tmp")),
            "{fault}: temporary files left behind: {extra:?}"
        );
        let (code, err) = reproduce(&out, &[]);
        assert_eq!(code, Some(0), "{fault}, then freed: {err}");
        assert_eq!(
            stripped_results(&out),
            stripped_results(&whole),
            "{fault}, then freed"
        );
    }
}

/// Inside a Slurm array task, `reproduce` runs the task's shard and says so in its first log
/// line; a job about to end stops cleanly before its next stage; a `--shard` that
/// contradicts the array is an error before any work.
#[test]
fn reproduce_takes_its_shard_from_a_slurm_array() {
    let dir = tempdir();
    let cfg = tiny_study_config(dir.path());
    let out = dir.path().join("study");
    let run = |extra: &[&str], job_end: Option<String>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_quant-robust"));
        if let Some(t) = job_end {
            c.env("SLURM_JOB_END_TIME", t);
        }
        c.args([
            "reproduce",
            "--config",
            cfg.to_str().unwrap(),
            "--device",
            "cpu",
        ])
        .args(["--out", out.to_str().unwrap(), "--max-stages", "1"])
        .args(extra)
        .envs([
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        let o = c.output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[], None);
    assert_eq!(code, Some(75), "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.contains("shard 2/3 (from the Slurm array"),
        "first log line: {first}\n{err}"
    );
    // A job whose end is already inside the margin stops before its first stage.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (code, err) = run(&[], Some((now + 60).to_string()));
    assert_eq!(code, Some(75), "{err}");
    assert!(
        err.contains("time budget 0 s (from SLURM_JOB_END_TIME"),
        "{err}"
    );
    assert!(err.contains("stopped early after 0 new stages"), "{err}");
    let (code, err) = run(&["--shard", "1/3"], None);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("contradicts the Slurm array task, which is shard 2/3"),
        "{err}"
    );
    assert!(!err.contains("study `tiny`"), "{err}");
}

/// SIGTERM stops `reproduce` once the stage (or evaluation unit) in progress is finished (what
/// it finished is kept), with exit status 75; the same command then finishes the study.
#[test]
fn sigterm_stops_reproduce_after_its_current_stage() {
    let dir = tempdir();
    let cfg = tiny_study_config(dir.path());
    let out = dir.path().join("study");
    let args = reproduce_args(&cfg, &out);
    let records = || {
        if !out.join("cache").is_dir() {
            return 0;
        }
        crate::study::walk(&out.join("cache"))
            .iter()
            .filter(|f| f.ends_with("record.json"))
            .count()
    };
    let status = sigterm_once(&args, || records() > 0, "no stage finished");
    assert_eq!(status.code(), Some(75), "{status:?}");
    let kept = records();
    assert!(kept >= 1);
    for f in crate::study::walk(&out) {
        assert_whole(&f);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, err) = qr_code(&a);
    assert_eq!(code, Some(0), "{err}");
    assert!(records() > kept && out.join("results.json").is_file());
}
