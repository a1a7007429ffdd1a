//! The study: configuration errors, presets and their grids, content keys, cache hits,
//! resume after interruption, shard + merge, findings on hand-made results, the report.

use std::path::Path;

use candle_core::Device;
use quant_robust::eval::robust::{EpsAccuracy, MaskingAtEps};
use quant_robust::eval::wilson95;
use quant_robust::quant::qat::AlphaInit;
use quant_robust::quant::Bits;
use quant_robust::study::config::{self, Init, StudyConfig};
use quant_robust::study::findings::{self, Status};
use quant_robust::study::plan::{self, ModelSpec};
use quant_robust::study::results::{self, AttackAccuracy, Cost, ModelResult, StudyResults};
use quant_robust::study::run::{self, RunOptions, RunStatus};
use quant_robust::train::TrainConfig;

use crate::common::{sample, tempdir};

fn err_of(json: &str) -> String {
    let dir = tempdir();
    let p = dir.path().join("study.json");
    std::fs::write(&p, json).unwrap();
    match StudyConfig::from_file(&p) {
        Ok(_) => panic!("{json} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_errors_name_the_setting() {
    let e = err_of(r#"{"nmae": "x"}"#);
    assert!(e.contains("nmae"), "{e}");
    let e = err_of(r#"{"eval": {"eps": ["8/255", "big"]}}"#);
    assert!(e.contains("big"), "{e}");
    let e = err_of(r#"{"eval": {"eps": ["8/255"]}}"#);
    assert!(
        e.contains("findings.f1_eps") && e.contains("eval.eps"),
        "{e}"
    );
    let e = err_of(r#"{"grid": {"ptq_table": {"inits": ["random"]}}}"#);
    assert!(e.contains("ptq_table") && e.contains("random"), "{e}");
    let e = err_of(r#"{"eval": {"attacks": ["pgd", "deepfool"]}}"#);
    assert!(e.contains("deepfool") && e.contains("unknown"), "{e}");
    let e = err_of(r#"{"seeds": []}"#);
    assert!(e.contains("seeds"), "{e}");
    let e = err_of(r#"{"grid": {"data_curve": {"fractions": [0.1, 1.5]}}}"#);
    assert!(e.contains("fractions") && e.contains("1.5"), "{e}");
    let e = err_of(r#"{"robust": {"train": {"epochs": 3}}}"#);
    assert!(e.contains("robust.train.adversarial"), "{e}");
    let e = err_of(r#"{"grid": {"qat_table": {"bits": ["w4b4"]}}}"#);
    assert!(e.contains("w4b4"), "{e}");
    let e = err_of(r#"{"eval": {"n": 0}}"#);
    assert!(e.contains("eval.n"), "{e}");
    let e = err_of(r#"{"qat": {"alpha_init_random": {"fixed": -3.0}}}"#);
    assert!(
        e.contains("qat.alpha_init_random") && e.contains("-3"),
        "{e}"
    );
    let e = err_of(r#"{"qat": {"alpha_init": {"fixed": 0.0}}}"#);
    assert!(e.contains("qat.alpha_init"), "{e}");
    let e = StudyConfig::preset("huge").unwrap_err().to_string();
    assert!(e.contains("huge") && e.contains("smoke"), "{e}");
    // ε written either way; fields left out take their defaults.
    let dir = tempdir();
    let p = dir.path().join("s.json");
    std::fs::write(&p, r#"{"eval": {"eps": [0.00784313725490196, "8/255"]}}"#).unwrap();
    let c = StudyConfig::from_file(&p).unwrap();
    assert!((c.eval.eps[1] - 8.0 / 255.0).abs() < 1e-12);
    assert_eq!(c.grid, config::Grid::default());
}

#[test]
fn presets_are_valid_and_cover_the_papers_tables() {
    for name in config::PRESETS {
        let c = StudyConfig::preset(name).unwrap();
        assert_eq!(c.name, name);
        let models = plan::models(&c);
        let ids: std::collections::BTreeSet<String> = models.iter().map(|m| m.id()).collect();
        assert_eq!(ids.len(), models.len(), "{name}: duplicate cells");
        for m in &models {
            for need in m.needs() {
                assert!(
                    models.contains(&need),
                    "{name}: {} needs {}",
                    m.id(),
                    need.id()
                );
            }
        }
    }
    let fast = StudyConfig::preset("fast").unwrap();
    let models = plan::models(&fast);
    let count = |f: &dyn Fn(&ModelSpec) -> bool| models.iter().filter(|m| f(m)).count();
    assert_eq!(count(&|m| !m.is_quantized()), 2);
    // PTQ: natural and robust × 6 bit widths.
    assert_eq!(count(&|m| matches!(m, ModelSpec::Ptq { .. })), 12);
    // QAT table 3 inits × AT no/yes × 2 bit widths = 12; the Figure 2 sweep 4 bits × 2 = 8;
    // the data curve 3 inits × 5 fractions = 15, of which the 3 at fraction 1 are table cells.
    assert_eq!(
        count(&|m| matches!(m, ModelSpec::Qat { .. })),
        12 + 8 + 15 - 3
    );
    for init in [Init::Random, Init::Natural, Init::Robust] {
        for adversarial in [false, true] {
            assert!(models.contains(&ModelSpec::Qat {
                init,
                bits: Bits::of(4, 4),
                adversarial,
                fraction: 1.0,
                seed: 0
            }));
        }
    }
    for b in [2, 3, 4, 8] {
        for bits in [Bits::of(32, b), Bits::of(b, 32)] {
            assert!(models.iter().any(|m| m.bits() == bits), "{bits}");
        }
    }
    assert_eq!(StudyConfig::preset("full").unwrap().seeds, vec![0, 1, 2]);
}

#[test]
fn keys_change_with_exactly_what_a_stage_reads() {
    let data = &sample().identity;
    let base = config::smoke();
    let keys = |c: &StudyConfig| {
        let k = run::Keys::new(c, data);
        k.models
            .iter()
            .map(|(s, key)| (s.id(), key.clone(), k.eval(c, s, data).unwrap()))
            .collect::<Vec<_>>()
    };
    let k0 = keys(&base);
    assert_eq!(k0, keys(&base.clone()), "keys are deterministic");

    let mut c = base.clone();
    c.eval.settings.pgd_steps += 1;
    for (a, b) in k0.iter().zip(keys(&c)) {
        assert_eq!(a.1, b.1, "{}: model key moved with eval settings", a.0);
        assert_ne!(a.2, b.2, "{}: eval key did not move", a.0);
    }

    let mut c = base.clone();
    c.natural.train.epochs += 1;
    for (a, b) in k0.iter().zip(keys(&c)) {
        let depends = a.0.contains("natural");
        assert_eq!(a.1 != b.1, depends, "{}: model key", a.0);
        // Every evaluation whose model or reference depends on the natural model moves.
        let spec = plan::models(&base)
            .into_iter()
            .find(|s| s.id() == a.0)
            .unwrap();
        let reads_natural = depends || spec.reference().is_some_and(|r| r.init() == Init::Natural);
        assert_eq!(a.2 != b.2, reads_natural, "{}: eval key", a.0);
    }

    let mut c = base.clone();
    c.ptq.calib += 1;
    for (a, b) in k0.iter().zip(keys(&c)) {
        assert_eq!(a.1 != b.1, a.0.starts_with("ptq-"), "{}", a.0);
    }

    // α's start: one setting for cells from random init, one for cells from a trained model.
    let mut c = base.clone();
    c.qat.alpha_init_random = AlphaInit::Fixed(5.0);
    for (a, b) in k0.iter().zip(keys(&c)) {
        assert_eq!(a.1 != b.1, a.0.starts_with("qat-random-"), "{}", a.0);
    }
    // BatchNorm re-estimation after QAT moves every QAT key, and nothing else.
    let mut c = base.clone();
    c.qat.bn_reestimate_batches = 16;
    for (a, b) in k0.iter().zip(keys(&c)) {
        assert_eq!(a.1 != b.1, a.0.starts_with("qat-"), "{}", a.0);
    }
    let mut c = base.clone();
    c.qat.alpha_init = AlphaInit::Fixed(5.0);
    for (a, b) in k0.iter().zip(keys(&c)) {
        let trained_init = a.0.starts_with("qat-") && !a.0.starts_with("qat-random-");
        assert_eq!(a.1 != b.1, trained_init, "{}", a.0);
    }

    // AutoAttack moves the evaluations of the models it selects, and only those.
    let mut c = base.clone();
    c.eval.autoattack = Some(config::AutoAttackEval::default());
    let specs = plan::models(&base);
    let sel = c.eval.autoattack.clone().unwrap();
    let mut selected = 0;
    for ((a, b), spec) in k0.iter().zip(keys(&c)).zip(&specs) {
        assert_eq!(a.1, b.1, "{}: model key moved with AutoAttack", a.0);
        let chosen = sel.models.contains(spec);
        selected += usize::from(chosen);
        assert_eq!(a.2 != b.2, chosen, "{}: eval key", a.0);
    }
    assert!(selected >= 4 && selected < specs.len(), "{selected}");
}

/// A study small enough to run several times in a test: the smoke grid shrunk further,
/// through configuration only.
pub(crate) fn tiny() -> StudyConfig {
    let mut c = config::smoke();
    c.name = "tiny".into();
    let t = |epochs| TrainConfig {
        epochs,
        batch_size: 32,
        eval_images: Some(40),
        eval_adv_images: 10,
        ..TrainConfig::default()
    };
    c.natural.train_count = Some(64);
    c.natural.train = t(1);
    c.robust.train_count = Some(64);
    c.robust.train = TrainConfig {
        adversarial: quant_robust::train::Adversarial::Pgd(c.qat.adversarial.clone()),
        ..t(1)
    };
    c.qat.finetune = TrainConfig { lr: 0.01, ..t(1) };
    c.qat.from_random = t(1);
    c.qat.adversarial.steps = 1;
    c.qat.calib = 32;
    c.ptq.calib = 32;
    c.grid.ptq_table.bits = vec![Bits::of(4, 4)];
    c.grid.qat_table.inits = vec![Init::Random, Init::Robust];
    c.grid.qat_table.fraction = 0.02;
    c.grid.data_curve.inits = vec![Init::Random, Init::Robust];
    c.grid.data_curve.fractions = vec![0.02, 0.03];
    c.grid.bits_sweep.fraction = 0.02;
    c.eval.n = Some(10);
    c.eval.attacks = vec!["fgsm".into(), "pgd".into(), "square".into()];
    c.eval.settings.pgd_steps = 1;
    c.eval.settings.square_queries = 2;
    c.eval.batch_size = 10;
    c.eval.wide = Some(config::WideEval {
        n: Some(20),
        attacks: vec!["fgsm".into()],
        eps: vec![8.0 / 255.0],
    });
    c.eval.autoattack = Some(config::AutoAttackEval {
        attack: quant_robust::attack::autoattack::AutoAttack {
            apgd_iterations: 2,
            fab_iterations: 2,
            targets: 2,
            square_queries: 4,
            ..Default::default()
        },
        ..Default::default()
    });
    c.validate().unwrap();
    c
}

/// The results without what legitimately differs between runs: timings, dates, device
/// speed.
pub(crate) fn strip(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for k in [
                "wall_s",
                "gpu_s",
                "images_per_s",
                "created_unix",
                "timings",
                "cost",
                "stage_wall_s",
                "stage_gpu_s",
                "eval_wall_s",
                "eval_gpu_s",
                "cpu_s",
                "train_cpu_s",
                "stage_cpu_s",
                "eval_cpu_s",
            ] {
                m.remove(k);
            }
            // F3's numbers include seconds.
            if m.get("id").and_then(|x| x.as_str()) == Some("F3") {
                m.remove("numbers");
                m.remove("note");
                m.remove("status");
            }
            for x in m.values_mut() {
                strip(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

/// A study folder's `results.json` without what differs between two runs of the same study
/// (timings, the code's commit): equal for a sharded, a resumed and a single-process run.
pub(crate) fn comparable_results(out: &Path) -> serde_json::Value {
    let f = out.join("results.json");
    let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    strip(&mut v);
    if let Some(m) = v["manifest"].as_object_mut() {
        m.remove("code");
    }
    v
}

/// Every file under `dir`.
pub(crate) fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}

fn results_json(c: &StudyConfig, out: &Path) -> serde_json::Value {
    let r = findings::judged(results::collect(c, &sample().identity, out, &Device::Cpu).unwrap());
    serde_json::to_value(&r).unwrap()
}

#[test]
fn cache_resume_and_shards_give_the_same_results() {
    let c = tiny();
    let data = sample();
    let dev = Device::Cpu;
    let n_models = plan::models(&c).len();
    let root = tempdir();
    let one = root.path().join("one");
    let opts = RunOptions::default();

    // One uninterrupted run: every stage computed (a model and an evaluation per model).
    let st = run::run(&c, data, &one, &dev, &opts).unwrap();
    assert_eq!(
        st,
        RunStatus::Complete {
            computed: 2 * n_models,
            cached: 0
        }
    );
    let full = results_json(&c, &one);
    let res: StudyResults = serde_json::from_value(full.clone()).unwrap();
    assert_eq!(res.models.len(), n_models);
    assert_eq!(res.findings.len(), 6);

    // Again: everything from the cache, identical results (timings included: they are
    // read, not measured).
    let st = run::run(&c, data, &one, &dev, &opts).unwrap();
    assert_eq!(
        st,
        RunStatus::Complete {
            computed: 0,
            cached: n_models
        }
    );
    let mut a = full.clone();
    let mut b = results_json(&c, &one);
    a["manifest"]["created_unix"] = 0.into();
    b["manifest"]["created_unix"] = 0.into();
    assert_eq!(a, b);

    // A changed evaluation setting recomputes the evaluations only.
    let mut c2 = c.clone();
    c2.eval.seed = 7;
    let st = run::run(&c2, data, &one, &dev, &opts).unwrap();
    assert_eq!(
        st,
        RunStatus::Complete {
            computed: n_models,
            cached: 0
        }
    );

    // Interrupted twice, then finished: the same results as the uninterrupted run.
    let two = root.path().join("two");
    let stop = |n| RunOptions {
        max_stages: Some(n),
        ..RunOptions::default()
    };
    assert!(matches!(
        run::run(&c, data, &two, &dev, &stop(3)).unwrap(),
        RunStatus::Interrupted { computed: 3, .. }
    ));
    assert!(results::collect(&c, &data.identity, &two, &dev)
        .unwrap_err()
        .to_string()
        .contains("not finished"));
    assert!(matches!(
        run::run(&c, data, &two, &dev, &stop(5)).unwrap(),
        RunStatus::Interrupted { computed: 5, .. }
    ));
    // The models alone next (the first 8 stages were the first 4 models, each a model and
    // then its evaluation), then the evaluations from the cached models.
    let models_only = RunOptions {
        scope: run::Scope::Models,
        ..RunOptions::default()
    };
    let st = run::run(&c, data, &two, &dev, &models_only).unwrap();
    assert_eq!(
        st,
        RunStatus::Complete {
            computed: n_models - 4,
            cached: 4
        },
        "{st:?}"
    );
    // Models without evaluations are not results: the error lists every missing one.
    let e = results::collect(&c, &data.identity, &two, &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{} missing", n_models - 4)), "{e}");
    for spec in plan::models(&c).iter().skip(4) {
        assert!(e.contains(&spec.id()), "{} not listed: {e}", spec.id());
    }
    let st = run::run(&c, data, &two, &dev, &opts).unwrap();
    assert_eq!(
        st,
        RunStatus::Complete {
            computed: n_models - 4,
            cached: 4
        },
        "{st:?}"
    );
    let mut expect = full.clone();
    strip(&mut expect);
    let mut got = results_json(&c, &two);
    strip(&mut got);
    assert_eq!(expect, got, "resumed run differs");

    // Two shards on "two machines", merged: the same results.
    let s1 = root.path().join("s1");
    let s2 = root.path().join("s2");
    // The second machine keeps the same data under another path: the keys use its hashes.
    let mut c_elsewhere = c.clone();
    c_elsewhere.data = "/elsewhere/cifar10-jpeg-sample.tar.gz".into();
    for (k, dir, cfg) in [(1, &s1, &c), (2, &s2, &c_elsewhere)] {
        let o = RunOptions {
            shard: Some(quant_robust::study::shard::Shard::new(k, 2).unwrap()),
            ..RunOptions::default()
        };
        assert!(matches!(
            run::run(cfg, data, dir, &dev, &o).unwrap(),
            RunStatus::Complete { .. }
        ));
    }
    assert!(results::collect(&c, &data.identity, &s1, &dev).is_err());
    let merged = root.path().join("merged");
    let mc = run::merge(&merged, &[s1.clone(), s2.clone()]).unwrap();
    assert_eq!(mc, c);
    let mut got = results_json(&c, &merged);
    strip(&mut got);
    assert_eq!(expect, got, "merged shards differ from one run");

    // Two runs on one study folder at once share it stage by stage: each stage is computed
    // once, by one of them, and the results are the single run's.
    let shared = root.path().join("shared");
    let (a, b) = std::thread::scope(|s| {
        let go = || s.spawn(|| run::run(&c, data, &shared, &dev, &opts).unwrap());
        let (a, b) = (go(), go());
        (a.join().unwrap(), b.join().unwrap())
    });
    let computed = |st: &RunStatus| match st {
        RunStatus::Complete { computed, .. } => *computed,
        RunStatus::Interrupted { .. } => panic!("{st:?}"),
    };
    assert_eq!(computed(&a) + computed(&b), 2 * n_models, "{a:?} {b:?}");
    assert!(
        computed(&a) > 0 && computed(&b) > 0,
        "one run did all: {a:?} {b:?}"
    );
    let mut got = results_json(&c, &shared);
    strip(&mut got);
    assert_eq!(expect, got, "two runs on one folder differ from one run");
    let locks = walk(&shared)
        .into_iter()
        .filter(|p| p.ends_with(quant_robust::io::DirLock::FILE))
        .count();
    assert_eq!(locks, 0, "a finished run leaves no lock");
    // Shards of another configuration are refused.
    let other = root.path().join("other");
    run::run(&c2, data, &other, &dev, &stop(1)).unwrap();
    let e = run::merge(&root.path().join("m2"), &[s1, other])
        .unwrap_err()
        .to_string();
    assert!(e.contains("different configuration"), "{e}");

    // The report is drawn from the results alone.
    let res: StudyResults = serde_json::from_value(full).unwrap();
    quant_robust::report::study::write(&res, &one).unwrap();
    let md = std::fs::read_to_string(one.join("report.md")).unwrap();
    for s in [
        "## Findings",
        "| F1 |",
        "| F6 |",
        "## PTQ",
        "## Cost",
        "## Gradient masking",
    ] {
        assert!(md.contains(s), "report.md lacks {s}");
    }
    for p in ["eps.svg", "bits.svg", "fraction.svg"] {
        let svg = std::fs::read_to_string(one.join("plots").join(p)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{p}");
    }
}

#[test]
fn fast_preset_runs_end_to_end_at_tiny_sizes() {
    // The `fast` grid unchanged; only sizes shrunk through configuration.
    let mut c = config::fast();
    let small = tiny();
    c.data = "embedded".into();
    c.natural = small.natural.clone();
    c.robust = small.robust.clone();
    c.qat.finetune = small.qat.finetune.clone();
    c.qat.from_random = small.qat.from_random.clone();
    c.qat.adversarial = small.qat.adversarial.clone();
    c.qat.calib = 32;
    c.ptq.calib = 32;
    c.grid.qat_table.fraction = 0.02;
    c.grid.bits_sweep.fraction = 0.02;
    c.grid.data_curve.fractions = vec![0.01, 0.02];
    c.eval = small.eval.clone();
    c.eval.attacks = vec![
        "fgsm".into(),
        "pgd".into(),
        "apgd-ce".into(),
        "square".into(),
    ];
    c.eval.settings.apgd_iterations = 2;
    c.validate().unwrap();
    assert_eq!(c.grid.ptq_table, config::fast().grid.ptq_table);
    let out = tempdir();
    let st = run::run(
        &c,
        sample(),
        out.path(),
        &Device::Cpu,
        &RunOptions::default(),
    )
    .unwrap();
    let n = plan::models(&c).len();
    assert_eq!(
        st,
        RunStatus::Complete {
            computed: 2 * n,
            cached: 0
        }
    );
    let r = findings::judged(
        results::collect(&c, &sample().identity, out.path(), &Device::Cpu).unwrap(),
    );
    results::write(&r, out.path()).unwrap();
    quant_robust::report::study::write(&r, out.path()).unwrap();
    assert_eq!(r.models.len(), n);
    for m in &r.models {
        assert!(m.clean.accuracy >= m.worst_case[0].accuracy, "{}", m.id);
        assert_eq!(m.raw_pgd.is_some(), m.spec.is_quantized(), "{}", m.id);
        assert!(out
            .path()
            .join("cells")
            .join(format!("{}.json", m.id))
            .is_file());
    }
    let ids: Vec<&str> = r.findings.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["F1", "F2", "F3", "F4", "F5", "F6"]);
    // AutoAttack on exactly the selected models, beside the other attacks on the same images.
    let sel = c.eval.autoattack.as_ref().unwrap();
    let mut with_aa = 0;
    for m in &r.models {
        assert_eq!(
            m.autoattack.is_some(),
            sel.models.contains(&m.spec),
            "{}",
            m.id
        );
        let Some(a) = &m.autoattack else { continue };
        with_aa += 1;
        let e = a.at(8.0 / 255.0).unwrap();
        assert_eq!(e.autoattack.total, m.clean.total);
        assert!(e.autoattack.correct <= m.clean.correct, "{}", m.id);
        let (w, both) = (
            e.worst_case.as_ref().unwrap(),
            e.worst_with_autoattack.as_ref().unwrap(),
        );
        assert_eq!(w, m.worst_at(8.0 / 255.0).unwrap(), "{}", m.id);
        assert!(
            both.correct <= w.correct.min(e.autoattack.correct),
            "{}",
            m.id
        );
        assert_eq!(e.after_stage.len(), 4);
        assert_eq!(e.reevaluation_mismatches, 0);
        assert!(e.pgd.is_some(), "{}", m.id);
    }
    assert!(with_aa >= 4, "{with_aa} models with AutoAttack");
    let report = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        report.contains("## AutoAttack (autoattack[apgd-ce+apgd-t+fab-t+square]"),
        "{report}"
    );
}

// ---- findings on hand-made results ----

const N: usize = 1000;

fn acc(eps: f64, k: usize) -> EpsAccuracy {
    EpsAccuracy {
        eps,
        correct: k,
        total: N,
        accuracy: k as f64 / N as f64,
        ci95: wilson95(k, N),
    }
}

/// A result for `spec`: clean 800/1000, worst case `w` at both ε, raw PGD `raw`, stage
/// cost `cost` seconds.
fn model(spec: ModelSpec, w: usize, raw: Option<usize>, cost: f64) -> ModelResult {
    let c = config::smoke();
    let eps = c.eval.eps.clone();
    ModelResult {
        id: spec.id(),
        checkpoint: String::new(),
        clean: acc(0.0, 800),
        attacks: vec![AttackAccuracy {
            attack: "pgd-10".into(),
            gradient_free: false,
            per_eps: eps.iter().map(|&e| acc(e, w)).collect(),
        }],
        worst_case: eps.iter().map(|&e| acc(e, w)).collect(),
        raw_pgd: raw.map(|r| eps.iter().map(|&e| acc(e, r)).collect()),
        zero_gradient_fraction: 0.0,
        raw_zero_gradient_fraction: raw.map(|_| 1.0),
        masking: eps
            .iter()
            .map(|&e| MaskingAtEps {
                eps: e,
                white_box_best: None,
                gradient_free: None,
                broken_only_without_gradients: 0,
                masking_suspected: false,
            })
            .collect(),
        alpha: None,
        wide: None,
        autoattack: None,
        cost: Cost {
            stage_wall_s: cost,
            stage_gpu_s: 0.0,
            eval_wall_s: 1.0,
            eval_gpu_s: 0.0,
            stage_cpu_s: 2.0 * cost,
            eval_cpu_s: 2.0,
            stage_images: 100,
        },
        spec,
    }
}

/// Results for the smoke grid where `worst(spec)` gives each model's worst-case count,
/// `raw(spec)` its raw-gradient count and `cost(spec)` its stage seconds.
fn hand_made(
    worst: impl Fn(&ModelSpec) -> usize,
    raw: impl Fn(&ModelSpec) -> usize,
    cost: impl Fn(&ModelSpec) -> f64,
) -> StudyResults {
    let c = config::smoke();
    let models: Vec<ModelResult> = plan::models(&c)
        .into_iter()
        .map(|s| {
            let r = s.is_quantized().then(|| raw(&s));
            model(s.clone(), worst(&s), r, cost(&s))
        })
        .collect();
    let mut r = StudyResults {
        data: sample().identity.clone(),
        models,
        across_seeds: Vec::new(),
        findings: Vec::new(),
        manifest: quant_robust::manifest::Manifest::new("study", &Device::Cpu),
        config: c,
        unfinished: Vec::new(),
    };
    r.findings = findings::all(&r);
    r
}

fn flat(_: &ModelSpec) -> usize {
    300
}

fn unit(_: &ModelSpec) -> f64 {
    10.0
}

fn status(r: &StudyResults, id: &str) -> Status {
    r.findings.iter().find(|v| v.id == id).unwrap().status
}

fn acts_only(s: &ModelSpec) -> bool {
    matches!(s, ModelSpec::Qat { bits, .. } if bits.weights().is_none())
}

fn weights_only(s: &ModelSpec) -> bool {
    matches!(s, ModelSpec::Qat { bits, .. } if bits.activations().is_none())
}

#[test]
fn f1_holds_fails_and_is_undecided() {
    let r = hand_made(|s| if acts_only(s) { 500 } else { 300 }, flat, unit);
    assert_eq!(status(&r, "F1"), Status::Holds);
    let v = &r.findings[0];
    assert!((v.margin.unwrap() - 0.2).abs() < 1e-9);
    let r = hand_made(|s| if weights_only(s) { 500 } else { 300 }, flat, unit);
    assert_eq!(status(&r, "F1"), Status::DoesNotHold);
    let r = hand_made(|s| if acts_only(s) { 310 } else { 300 }, flat, unit);
    assert_eq!(status(&r, "F1"), Status::Undecided);
}

fn ptq_of(s: &ModelSpec, init: Init) -> bool {
    matches!(s, ModelSpec::Ptq { init: i, .. } if *i == init)
}

#[test]
fn f2_holds_fails_and_is_undecided() {
    let r = hand_made(
        |s| if ptq_of(s, Init::Robust) { 400 } else { 100 },
        flat,
        unit,
    );
    assert_eq!(status(&r, "F2"), Status::Holds);
    let r = hand_made(
        |s| if ptq_of(s, Init::Natural) { 400 } else { 100 },
        flat,
        unit,
    );
    assert_eq!(status(&r, "F2"), Status::DoesNotHold);
    let r = hand_made(flat, flat, unit);
    assert_eq!(status(&r, "F2"), Status::Undecided);
}

/// A QAT cell with adversarial training.
fn at(s: &ModelSpec) -> bool {
    matches!(
        s,
        ModelSpec::Qat {
            adversarial: true,
            ..
        }
    )
}

#[test]
fn f3_needs_both_robustness_and_a_large_cost() {
    let r = hand_made(
        |s| if at(s) { 400 } else { 100 },
        flat,
        |s| if at(s) { 30.0 } else { 10.0 },
    );
    assert_eq!(status(&r, "F3"), Status::Holds);
    let v = r.findings.iter().find(|v| v.id == "F3").unwrap();
    assert_eq!(v.numbers[0].label, "cost AT-QAT / QAT");
    assert!((v.numbers[0].value - 3.0).abs() < 1e-9);
    // Robustness bought cheaply: the "large cost" half fails.
    let r = hand_made(
        |s| if at(s) { 400 } else { 100 },
        flat,
        |s| if at(s) { 12.0 } else { 10.0 },
    );
    assert_eq!(status(&r, "F3"), Status::DoesNotHold);
    let r = hand_made(
        |s| if at(s) { 100 } else { 400 },
        flat,
        |s| if at(s) { 30.0 } else { 10.0 },
    );
    assert_eq!(status(&r, "F3"), Status::DoesNotHold);
    let r = hand_made(flat, flat, |s| if at(s) { 30.0 } else { 10.0 });
    assert_eq!(status(&r, "F3"), Status::Undecided);
}

/// F3 weighs the cost in CPU seconds where every compared stage has them (a run paused, or
/// sharing its cores, has wall seconds that say little of its work), else in wall seconds.
#[test]
fn f3_weighs_the_cost_in_cpu_seconds_where_every_stage_has_them() {
    let mut r = hand_made(
        |s| if at(s) { 400 } else { 100 },
        flat,
        |s| if at(s) { 12.0 } else { 10.0 },
    );
    for m in &mut r.models {
        m.cost.stage_cpu_s = if at(&m.spec) { 30.0 } else { 10.0 };
    }
    r.findings = findings::all(&r);
    assert_eq!(status(&r, "F3"), Status::Holds);
    let v = r.findings.iter().find(|v| v.id == "F3").unwrap();
    assert!((v.numbers[0].value - 3.0).abs() < 1e-9);
    assert_eq!(v.numbers[1].label, "stage CPU seconds, AT-QAT (sum)");
    // One stage without CPU seconds: the wall seconds decide (1.2x: not a large cost).
    let m = r.models.iter_mut().find(|m| at(&m.spec)).unwrap();
    m.cost.stage_cpu_s = 0.0;
    r.findings = findings::all(&r);
    assert_eq!(status(&r, "F3"), Status::DoesNotHold);
    let v = r.findings.iter().find(|v| v.id == "F3").unwrap();
    assert!((v.numbers[0].value - 1.2).abs() < 1e-9);
    assert_eq!(v.numbers[1].label, "stage wall seconds, AT-QAT (sum)");
}

#[test]
fn f4_compares_robust_init_with_every_other_init() {
    let curve = |s: &ModelSpec, init: Init| matches!(s, ModelSpec::Qat { init: i, adversarial: true, bits, .. } if *i == init && *bits == Bits::of(4, 4));
    let r = hand_made(
        |s| {
            if curve(s, Init::Robust) {
                500
            } else if curve(s, Init::Natural) {
                350
            } else {
                200
            }
        },
        flat,
        unit,
    );
    assert_eq!(status(&r, "F4"), Status::Holds);
    // The weaker comparison (robust vs natural) decides.
    let v = r.findings.iter().find(|v| v.id == "F4").unwrap();
    assert!((v.margin.unwrap() - 0.15).abs() < 1e-9, "{v:?}");
    // Robust init beats random but not natural: undecided / does not hold.
    let r = hand_made(
        |s| {
            if curve(s, Init::Robust) || curve(s, Init::Natural) {
                500
            } else {
                200
            }
        },
        flat,
        unit,
    );
    assert_eq!(status(&r, "F4"), Status::Undecided);
    let r = hand_made(
        |s| if curve(s, Init::Robust) { 100 } else { 400 },
        flat,
        unit,
    );
    assert_eq!(status(&r, "F4"), Status::DoesNotHold);
}

#[test]
fn f5_needs_the_pipeline_to_change_the_conclusion() {
    // Quantized cells all equal to their references: no effect anywhere.
    let r = hand_made(flat, flat, unit);
    assert_eq!(status(&r, "F5"), Status::DoesNotHold);
    // PTQ hurts the robust model, QAT+AT helps the natural one: two classes.
    let r = hand_made(
        |s| match s {
            ModelSpec::Fp {
                init: Init::Robust, ..
            } => 500,
            ModelSpec::Fp { .. } => 10,
            ModelSpec::Ptq {
                init: Init::Robust, ..
            } => 200,
            ModelSpec::Qat {
                adversarial: true,
                init: Init::Natural,
                ..
            } => 300,
            s if s.reference().is_some_and(|r| r.init() == Init::Robust) => 500,
            _ => 10,
        },
        flat,
        unit,
    );
    assert_eq!(status(&r, "F5"), Status::Holds);
    let v = r.findings.iter().find(|v| v.id == "F5").unwrap();
    assert!(
        v.numbers[0].value >= 1.0 && v.numbers[1].value >= 1.0,
        "{v:?}"
    );
}

#[test]
fn f6_names_masking_only_when_raw_gradients_overstate_robustness() {
    let r = hand_made(flat, |s| if acts_only(s) { 700 } else { 300 }, unit);
    assert_eq!(status(&r, "F6"), Status::Holds);
    let v = r.findings.iter().find(|v| v.id == "F6").unwrap();
    assert!(v.note.contains("w32a4"), "{}", v.note);
    let r = hand_made(flat, flat, unit);
    assert_eq!(status(&r, "F6"), Status::DoesNotHold);
    let r = hand_made(flat, |_| 310, unit);
    assert_eq!(status(&r, "F6"), Status::Undecided);
}

#[test]
fn findings_without_their_cells_are_not_tested() {
    let mut r = hand_made(flat, flat, unit);
    r.models.clear();
    for v in findings::all(&r) {
        assert_eq!(v.status, Status::NotTested, "{}", v.id);
    }
}

#[test]
fn difference_interval_is_newcombes() {
    // Newcombe (1998), example (a): 56/70 vs 48/80 → 0.2000, (0.0524, 0.3339).
    let (d, ci) = findings::diff_ci95(
        quant_robust::eval::Accuracy {
            correct: 56,
            total: 70,
        },
        quant_robust::eval::Accuracy {
            correct: 48,
            total: 80,
        },
    );
    assert!((d - 0.2).abs() < 1e-12);
    assert!(
        (ci.0 - 0.0524).abs() < 5e-4 && (ci.1 - 0.3339).abs() < 5e-4,
        "{ci:?}"
    );
}

#[test]
fn seed_summary_uses_the_t_interval() {
    let (m, ci) = results::mean_ci95(&[0.5, 0.6, 0.7]);
    assert!((m - 0.6).abs() < 1e-12);
    // s = 0.1, t(2) = 4.303: half-width 4.303 · 0.1 / √3.
    let h = 4.303 * 0.1 / 3f64.sqrt();
    assert!((ci.0 - (0.6 - h)).abs() < 1e-9 && (ci.1 - (0.6 + h)).abs() < 1e-9);
}

/// PACT α that ends at its clamp or far from its start marks the cell; the pooled verdicts
/// leave such cells out and say so.
#[test]
fn alpha_runaway_is_flagged_and_left_out_of_the_verdicts() {
    use quant_robust::study::results::AlphaLog;
    use std::collections::BTreeMap;
    let h = |pairs: &[(&str, f32)]| -> BTreeMap<String, f32> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    };
    let bounds = (0.01, 100.0);
    let calm = [h(&[("a", 4.0), ("b", 6.0)]), h(&[("a", 5.0), ("b", 3.0)])];
    assert!(AlphaLog::from_history(&calm, bounds, 10.0)
        .unwrap()
        .ran_away
        .is_empty());
    let clamped = [h(&[("a", 4.0), ("b", 6.0)]), h(&[("a", 100.0), ("b", 3.0)])];
    assert_eq!(
        AlphaLog::from_history(&clamped, bounds, 10.0)
            .unwrap()
            .ran_away,
        vec!["a".to_string()]
    );
    let grown = [h(&[("a", 4.0), ("b", 6.0)]), h(&[("a", 0.5), ("b", 70.0)])];
    assert_eq!(
        AlphaLog::from_history(&grown, bounds, 10.0)
            .unwrap()
            .ran_away,
        vec!["b".to_string()]
    );
    assert!(AlphaLog::from_history(&grown, bounds, 20.0)
        .unwrap()
        .ran_away
        .is_empty());
    assert!(AlphaLog::from_history(&[BTreeMap::new()], bounds, 10.0).is_none());
    // Calibrated at the bound already (a random network's activations) is not a run-away.
    let clamped_from_start = [h(&[("a", 100.0)]), h(&[("a", 99.99)])];
    assert!(AlphaLog::from_history(&clamped_from_start, bounds, 10.0)
        .unwrap()
        .ran_away
        .is_empty());

    // With one activations-only cell's α run away, that pair leaves F1's pool, the note
    // names it, and the verdict rests on the other bit widths.
    let g = |p: &str| config::GivenCheckpoint {
        path: p.into(),
        sha256: "a".repeat(64),
    };
    let mut r = hand_made_for(&config::cpu_with(g("n"), g("r")));
    let before = r.findings[0].numbers.len();
    assert_eq!(before, 2 + 2 * 3);
    let victim = r.models.iter_mut().find(|m| acts_only(&m.spec)).unwrap();
    victim.alpha = AlphaLog::from_history(&clamped, bounds, 10.0);
    let id = victim.id.clone();
    r.findings = findings::all(&r);
    let v = &r.findings[0];
    assert!(
        v.note.contains("ran away") && v.note.contains(&id),
        "{}",
        v.note
    );
    assert!(v.numbers.iter().all(|n| n.label != id));
    assert_eq!(v.numbers.len(), before - 2);
    // F5 leaves the cell out too.
    let v5 = r.findings.iter().find(|v| v.id == "F5").unwrap();
    assert!(v5.note.contains(&id), "{}", v5.note);
    let md = quant_robust::report::study::markdown(&r);
    assert!(md.contains("PACT α per layer") && md.contains("**ran away**"));
}

/// A full-precision stage given as a checkpoint: its key is the file's hash (not the
/// recipe), the file is checked against it, and the study copies it into its cache.
#[test]
fn given_checkpoints_are_keyed_by_their_hash_and_checked() {
    use quant_robust::study::config::GivenCheckpoint;
    let data = sample();
    let dir = tempdir();
    let ck = dir.path().join("natural.safetensors");
    let model = quant_robust::model::ResNet20::init(
        &mut quant_robust::rng::Rng::new(0, "init"),
        &Device::Cpu,
    )
    .unwrap();
    let m = quant_robust::manifest::Manifest::new("checkpoint", &Device::Cpu);
    quant_robust::model::checkpoint::save(&model, &ck, &m).unwrap();
    let sha = quant_robust::data::file_sha256(&ck).unwrap();
    let given = GivenCheckpoint {
        path: ck.to_string_lossy().into_owned(),
        sha256: sha.clone(),
    };
    let mut c = tiny();
    c.natural.checkpoint = Some(given.clone());
    c.validate().unwrap();
    let keys = |c: &StudyConfig| {
        let k = run::Keys::new(c, &data.identity);
        k.models.clone()
    };
    let k0 = keys(&c);
    let mut other_recipe = c.clone();
    other_recipe.natural.train.epochs += 5;
    assert_eq!(
        k0,
        keys(&other_recipe),
        "a given checkpoint's recipe moved keys"
    );
    let mut other_file = c.clone();
    other_file.natural.checkpoint = Some(GivenCheckpoint {
        sha256: "0".repeat(64),
        ..given.clone()
    });
    for ((s, a), (_, b)) in k0.iter().zip(keys(&other_file)) {
        let reads_natural =
            s.init() == Init::Natural || s.parent().is_some_and(|p| p.init() == Init::Natural);
        assert_eq!(a != &b, reads_natural, "{}", s.id());
    }
    // Not a sha256: a configuration error naming the field.
    let mut bad = c.clone();
    bad.natural.checkpoint = Some(GivenCheckpoint {
        sha256: "abc".into(),
        ..given.clone()
    });
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("natural.checkpoint.sha256"), "{e}");
    // The first stage of the run is the given model: copied, not trained.
    let out = dir.path().join("study");
    let opts = RunOptions {
        max_stages: Some(1),
        ..RunOptions::default()
    };
    let st = run::run(&c, data, &out, &Device::Cpu, &opts).unwrap();
    assert!(
        matches!(st, RunStatus::Interrupted { computed: 1, .. }),
        "{st:?}"
    );
    let key = &k0[0].1;
    let copied = run::cache_dir(&out, key).join("model.safetensors");
    assert_eq!(quant_robust::data::file_sha256(&copied).unwrap(), sha);
    // The same path with other bytes is refused, with both hashes in the message.
    let e = run::run(
        &other_file,
        data,
        &dir.path().join("s2"),
        &Device::Cpu,
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(&sha) && e.contains(&"0".repeat(64)), "{e}");
}

#[test]
fn cpu_grid_has_every_cell_the_findings_rest_on() {
    use quant_robust::study::config::GivenCheckpoint;
    let g = |p: &str| GivenCheckpoint {
        path: p.into(),
        sha256: "a".repeat(64),
    };
    let c = config::cpu_with(g("n.safetensors"), g("r.safetensors"));
    c.validate().unwrap();
    let models = plan::models(&c);
    let count = |f: &dyn Fn(&ModelSpec) -> bool| models.iter().filter(|m| f(m)).count();
    assert_eq!(count(&|m| !m.is_quantized()), 2);
    // PTQ: 2 inits × (6 bit widths + weights-only + activations-only).
    assert_eq!(count(&|m| matches!(m, ModelSpec::Ptq { .. })), 16);
    // QAT W4A4 table 3 × 2, Figure 2 sweep 3 × 2, the data curve 3 inits × 3 fractions with
    // AT of which the 3 at fraction 1 are table cells.
    assert_eq!(
        count(&|m| matches!(m, ModelSpec::Qat { .. })),
        6 + 6 + 9 - 3
    );
    let r = hand_made_for(&c);
    for v in &r.findings {
        assert_ne!(
            v.status,
            Status::NotTested,
            "{} not tested on the cpu grid",
            v.id
        );
    }
    assert_eq!(c.eval.n, Some(1000));
    assert_eq!(c.eval.wide.as_ref().unwrap().n, None);
}

/// Flat hand-made results on any grid (every model 300/1000 worst case).
fn hand_made_for(c: &StudyConfig) -> StudyResults {
    let models: Vec<ModelResult> = plan::models(c)
        .into_iter()
        .map(|s| {
            let r = s.is_quantized().then_some(300);
            model(s.clone(), 300, r, 10.0)
        })
        .collect();
    let mut r = StudyResults {
        data: sample().identity.clone(),
        models,
        across_seeds: Vec::new(),
        findings: Vec::new(),
        manifest: quant_robust::manifest::Manifest::new("study", &Device::Cpu),
        config: c.clone(),
        unfinished: Vec::new(),
    };
    r.findings = findings::all(&r);
    r
}

/// A folder lock names its owner while it is held and ends with it; a lock left by a killed
/// process of this host is taken over; another host's lock holds while it is touched and is
/// taken over once stale; the owner's heartbeat keeps it fresh.
#[test]
fn a_folder_lock_names_its_owner_and_a_dead_owners_lock_is_taken_over() {
    use quant_robust::io::{Claim, DirLock};
    let dir = tempdir();
    let first = DirLock::acquire(dir.path()).unwrap();
    let e = DirLock::acquire(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("in use by process") && e.contains(&std::process::id().to_string()),
        "{e}"
    );
    assert!(matches!(
        DirLock::try_acquire(dir.path()).unwrap(),
        Claim::Held { pid, .. } if pid == std::process::id().to_string()
    ));
    drop(first);
    assert!(!dir.path().join(DirLock::FILE).exists());
    // A stale lock: a process id that does not run, on this host.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    std::fs::write(
        dir.path().join(DirLock::FILE),
        format!("4194303999 {}", host.trim()),
    )
    .unwrap();
    let taken = DirLock::acquire(dir.path()).expect("a dead owner's lock is taken over");
    drop(taken);
    // Another host's processes cannot be seen from here: its lock holds while its owner
    // touches it ...
    let lock = dir.path().join(DirLock::FILE);
    std::fs::write(&lock, "12 some-other-host").unwrap();
    let touch = |ago: std::time::Duration| {
        std::fs::File::options()
            .write(true)
            .open(&lock)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - ago)
            .unwrap()
    };
    touch(DirLock::STALE - std::time::Duration::from_secs(30));
    let e = DirLock::acquire(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("some-other-host") && e.contains("remove the lock"),
        "{e}"
    );
    // ... and is taken over once its heartbeat is older than STALE (a killed cluster job).
    touch(DirLock::STALE + std::time::Duration::from_secs(30));
    let mine = DirLock::acquire(dir.path()).expect("a stale lock of another host is taken over");
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        format!("{} {}", std::process::id(), host.trim())
    );
    // The owner's heartbeat keeps its own lock fresh.
    touch(DirLock::STALE * 2);
    let t = std::time::Instant::now();
    while t.elapsed() < DirLock::HEARTBEAT + std::time::Duration::from_secs(5) {
        let age = std::fs::metadata(&lock)
            .unwrap()
            .modified()
            .unwrap()
            .elapsed();
        if age.is_ok_and(|a| a < DirLock::HEARTBEAT) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let age = std::fs::metadata(&lock)
        .unwrap()
        .modified()
        .unwrap()
        .elapsed()
        .unwrap();
    assert!(
        age < DirLock::HEARTBEAT,
        "the heartbeat did not touch the lock: {age:?}"
    );
    drop(mine);
    assert!(!lock.exists());
}

/// Every path to a number in a JSON value, as keys and indices.
fn number_paths(v: &serde_json::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        serde_json::Value::Number(_) => out.push(at.clone()),
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                at.push(k.clone());
                number_paths(x, at, out);
                at.pop();
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(i.to_string());
                number_paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

    /// The smoke preset's configuration with one number replaced by an edge value (negative,
    /// zero, a fraction where a count belongs, huge): never a panic; an ε or a data fraction
    /// outside its range is refused; a configuration that is accepted can be planned.
    #[test]
    fn a_config_with_one_bad_number_is_refused_or_usable(
        which in 0usize..10_000,
        value in proptest::sample::select(vec![-1.0, -1e-9, 0.0, 0.5, 1.0, 1.5, 2.0, 255.0, 1e9, 1e300]),
    ) {
        let mut v = serde_json::to_value(config::smoke()).unwrap();
        let mut paths = Vec::new();
        number_paths(&v, &mut Vec::new(), &mut paths);
        let path = &paths[which % paths.len()];
        let mut slot = &mut v;
        for k in path {
            slot = match slot {
                serde_json::Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
                other => &mut other[k.as_str()],
            };
        }
        *slot = serde_json::json!(value);
        let dir = tempdir();
        let p = dir.path().join("study.json");
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
        let joined = path.join(".");
        let r = StudyConfig::from_file(&p);
        let out_of_range = (joined.contains("eps") && !(0.0..=1.0).contains(&value))
            || (joined.contains("fraction") && !(value > 0.0 && value <= 1.0));
        if out_of_range {
            proptest::prop_assert!(r.is_err(), "{} = {} accepted", joined, value);
        }
        if let Ok(c) = r {
            let _ = plan::models(&c);
        }
    }
}

#[test]
fn the_shard_comes_from_the_flag_or_the_slurm_array_and_they_must_agree() {
    use quant_robust::study::shard::Shard;
    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }
    let s = |k, n| Shard::new(k, n).unwrap();
    // Outside an array job: the flag, or nothing.
    assert_eq!(Shard::from_slurm(env(&[])).unwrap(), None);
    assert_eq!(Shard::resolve(None, env(&[])).unwrap(), None);
    assert_eq!(
        Shard::resolve(Some(s(2, 4)), env(&[])).unwrap(),
        Some((s(2, 4), "--shard"))
    );
    // `--array=0-3`, `--array=1-4`, `--array=10-16:3`.
    for (vars, want) in [
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "0"),
                ("SLURM_ARRAY_TASK_MIN", "0"),
                ("SLURM_ARRAY_TASK_MAX", "3"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ][..],
            s(1, 4),
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_MAX", "4"),
            ][..],
            s(4, 4),
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "13"),
                ("SLURM_ARRAY_TASK_MIN", "10"),
                ("SLURM_ARRAY_TASK_MAX", "16"),
                ("SLURM_ARRAY_TASK_STEP", "3"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ][..],
            s(2, 3),
        ),
    ] {
        assert_eq!(
            Shard::from_slurm(env(vars)).unwrap(),
            Some(want),
            "{vars:?}"
        );
        let (got, from) = Shard::resolve(None, env(vars)).unwrap().unwrap();
        assert_eq!(got, want);
        assert!(from.contains("Slurm"), "{from}");
        // The flag may repeat the array's shard, never contradict it.
        assert!(Shard::resolve(Some(want), env(vars)).is_ok());
        let other = s(want.index() % want.count() + 1, want.count());
        if other != want {
            let e = Shard::resolve(Some(other), env(vars))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("contradicts") && e.contains(&want.to_string()),
                "{e}"
            );
        }
    }
    // Arrays that no K/N describes, and broken variables: errors naming the variable.
    for (vars, names) in [
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "3"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_MAX", "7"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
            ][..],
            "SLURM_ARRAY_TASK_COUNT",
        ),
        (&[("SLURM_ARRAY_TASK_ID", "3")][..], "SLURM_ARRAY_TASK_MIN"),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "x"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_MAX", "3"),
            ][..],
            "SLURM_ARRAY_TASK_ID",
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "9"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_MAX", "3"),
            ][..],
            "SLURM_ARRAY_TASK_ID",
        ),
    ] {
        let e = Shard::from_slurm(env(vars)).unwrap_err().to_string();
        assert!(e.contains(names), "{vars:?}: {e}");
    }
    // `K/N` strings.
    assert_eq!("3/5".parse::<Shard>().unwrap(), s(3, 5));
    for bad in ["0/3", "4/3", "3", "a/b", "1/0", ""] {
        assert!(bad.parse::<Shard>().is_err(), "{bad}");
    }
    // Shard K of N owns the jobs K-1, K-1+N, ...
    assert!(s(2, 3).owns(1) && s(2, 3).owns(4) && !s(2, 3).owns(2));
}

#[test]
fn a_slurm_jobs_end_time_becomes_the_time_left_less_a_margin() {
    use quant_robust::study::slurm::seconds_left;
    let var = |v: &'static str| move |k: &str| (k == "SLURM_JOB_END_TIME").then(|| v.to_string());
    assert_eq!(seconds_left(|_| None, 1000.0, 300.0).unwrap(), None);
    assert_eq!(
        seconds_left(var("5000"), 1000.0, 300.0).unwrap(),
        Some(3700.0)
    );
    // Already inside the margin: stop at once, not a negative budget.
    assert_eq!(seconds_left(var("1100"), 1000.0, 300.0).unwrap(), Some(0.0));
    let e = seconds_left(var("soon"), 1000.0, 300.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SLURM_JOB_END_TIME") && e.contains("soon"),
        "{e}"
    );
}
