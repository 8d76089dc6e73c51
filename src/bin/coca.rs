//! `coca`: the command-line front end. It owns exit codes (0 ok, 2 error), prints errors as one
//! line on stderr, and treats a closed stdout (broken pipe) as success.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use coca_edge::classify::{self, Templates};
use coca_edge::model::{self, EngineOptions};
use coca_edge::pipeline::FrameRequest;
use coca_edge::stream::{FrameEvent, Sink, Summary};
use coca_edge::vision::DecodedImage;
use coca_edge::{Pipeline, PipelineOptions};

#[derive(Parser, Debug)]
#[command(name = "coca", version, about = "CoCa on robots: zero-shot labels and embeddings for images, through tract")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct Global {
    /// Model bundle folder (default: $COCA_MODEL, else the bundle shipped in models/)
    #[arg(long, global = true, env = "COCA_MODEL", value_name = "DIR")]
    model: Option<PathBuf>,
    /// Threads for inference (default: the board profile's, else all cores)
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Board profile for the defaults: raspberry-pi-4, raspberry-pi-5, jetson-orin-nano,
    /// jetson-agx-orin, or auto (from /proc/device-tree/model, else the CPU); see boards/
    #[arg(long, global = true, env = "COCA_BOARD", value_name = "NAME")]
    board: Option<String>,
    /// Weights precision: f32, f16 or int8 (default: the board profile's, else f32); graphs
    /// the bundle has only in f32 stay f32
    #[arg(long, global = true, env = "COCA_PRECISION", value_name = "P")]
    precision: Option<String>,
    /// Use --precision f16 even where this CPU has no fp16 arithmetic (tract then runs a
    /// generic kernel, hundreds of times slower)
    #[arg(long, global = true)]
    force_precision: bool,
    /// More log output (-v info, -vv debug)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr
    #[arg(short, long, global = true)]
    quiet: bool,
}

// parsed once per process: the size of the largest arguments struct does not matter
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Zero-shot classify images against text labels
    Classify(ClassifyArgs),
    /// Print image embeddings (L2-normalised contrastive embeddings)
    Embed(EmbedArgs),
    /// Show the bundle, its graphs, precision, threads and CPU features
    Info(InfoArgs),
    /// Time the image path on this machine: medians after warm-up
    Bench(BenchArgs),
    /// Caption images (open_clip generate() semantics; default: beam search, 6 beams, 3 groups)
    Caption(CaptionArgs),
    /// Labels and a caption from one encoder pass, with per-stage timings
    Describe(DescribeArgs),
    /// Process a stream of frames (files, folders, Y4M, MJPEG, raw frames on stdin) and print
    /// one JSON line per processed frame (schema 1), then a summary line
    Stream(StreamArgs),
    /// Heads trained on the frozen encoder: your own classes from a few labelled images
    #[command(subcommand)]
    Head(HeadCmd),
    /// Run one graph N times on fixed inputs and print a checksum, with no timing output: the
    /// workload of the exact ARM instruction measure (boards/cross/armcount.sh)
    #[command(hide = true)]
    GraphRuns(GraphRunsArgs),
}

#[derive(Args, Debug)]
struct GraphRunsArgs {
    /// image_encoder, cross_kv or decoder_step
    #[arg(long, value_parser = ["image_encoder", "cross_kv", "decoder_step"])]
    graph: String,
    /// Runs of the graph after the set-up (the measure takes the difference of two run counts)
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// decoder_step: sequences per step (1 = greedy, 6 = six beams)
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// decoder_step: tokens already in the KV cache
    #[arg(long, default_value_t = 0)]
    past: usize,
}

#[derive(Args, Debug)]
struct StreamArgs {
    /// Input: a folder or image, a .y4m or .mjpeg file, file://PATH, or - for raw frames on stdin
    #[arg(value_name = "INPUT")]
    input: String,
    #[command(flatten)]
    labels: LabelArgs,
    /// Labels per frame
    #[arg(long = "top", default_value_t = 3, value_name = "N")]
    top: usize,
    /// Raw frame format for - or a raw file, e.g. yuyv:640x480, nv12:1280x720, rgb24:640x480
    #[arg(long, value_name = "FMT:WxH")]
    input_format: Option<String>,
    /// Process every frame of a file instead of the newest one (no drops, no pacing)
    #[arg(long)]
    every_frame: bool,
    /// Caption every N processed frames (0 = never)
    #[arg(long, default_value_t = 0, value_name = "N")]
    caption_every: usize,
    /// Caption when the embedding moved: 1 - cosine to the last captioned frame above T
    #[arg(long, value_name = "T")]
    caption_on_change: Option<f32>,
    /// Stop after N processed frames
    #[arg(long, value_name = "N")]
    max_frames: Option<u64>,
    /// Camera pixel formats to try, in order: yuyv, mjpeg, nv12, rgb, bgr [default: all, in that order]
    #[arg(long, value_name = "LIST")]
    camera_format: Option<String>,
    /// Camera resolution to ask for, e.g. 640x480 (the driver may pick the nearest)
    #[arg(long, value_name = "WxH")]
    camera_size: Option<String>,
    /// Camera frame rate to ask for
    #[arg(long, value_name = "FPS")]
    camera_fps: Option<u32>,
    /// Exit non-zero when no frame arrives for this many seconds (for systemd's Restart=)
    #[arg(long, value_name = "SECONDS")]
    watchdog: Option<f64>,
    /// Save annotated frames (labels, caption, FPS) to a .mjpeg file or a folder of JPEGs
    #[arg(long, value_name = "PATH")]
    save: Option<std::path::PathBuf>,
    /// Serve a live annotated preview at this address, e.g. 127.0.0.1:8090 (page at /, MJPEG at /stream.mjpg)
    #[arg(long, value_name = "ADDR")]
    preview: Option<String>,
    /// A head trained with `coca head train`, run on every frame beside the labels
    #[arg(long, value_name = "HEAD.json")]
    head: Option<PathBuf>,
    /// Teach mode (with --preview): the page's "save this frame" button (or POST
    /// /teach?class=NAME) saves the current frame as DIR/NAME/*.jpg, for `coca head train --data DIR`
    #[arg(long, value_name = "DIR", requires = "preview")]
    teach: Option<PathBuf>,
    #[command(flatten)]
    opts: CaptionOpts,
}

#[derive(Args, Debug, Clone)]
struct CaptionOpts {
    /// Search: greedy, beam, top-k or top-p [default: the model's, else beam]
    #[arg(long, value_parser = ["greedy", "beam", "top-k", "top-p"])]
    sampling: Option<String>,
    /// Beams (beam search)
    #[arg(long, default_value_t = 6)]
    beams: usize,
    /// Beam groups, searched one after the other (beam search)
    #[arg(long, default_value_t = 3)]
    beam_groups: usize,
    /// Longest sequence, start token included (open_clip's seq_len); at most the decoder's positions
    #[arg(long, default_value_t = 30)]
    max_tokens: usize,
    /// EOT forbidden before this length (open_clip's min_seq_len)
    #[arg(long, default_value_t = 5)]
    min_tokens: usize,
    /// k for --sampling top-k
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// p for --sampling top-p
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Sampling temperature
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Repetition penalty (1 = none)
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed for sampling
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl CaptionOpts {
    /// The options asked for; without --sampling, the model's default search
    /// ([`Pipeline::default_caption_options`]).
    fn to_options(&self, p: &Pipeline) -> coca_edge::caption::CaptionOptions {
        use coca_edge::caption::{CaptionOptions, Search};
        let search = match self.sampling.as_deref() {
            Some("greedy") => Search::Greedy,
            Some("top-k") => Search::TopK { k: self.top_k },
            Some("top-p") => Search::TopP { p: self.top_p },
            Some(_) => Search::Beam { beams: self.beams, groups: self.beam_groups },
            None => match p.default_caption_options().search {
                Search::Greedy => Search::Greedy,
                _ => Search::Beam { beams: self.beams, groups: self.beam_groups },
            },
        };
        CaptionOptions {
            search,
            max_tokens: self.max_tokens,
            min_tokens: self.min_tokens,
            temperature: self.temperature,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

#[derive(Args, Debug)]
struct CaptionArgs {
    /// Image files
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    opts: CaptionOpts,
    /// JSON lines output: {"image", "caption", "ids", "score"}
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct DescribeArgs {
    /// Image files
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    labels: LabelArgs,
    /// Labels to show
    #[arg(long = "top", default_value_t = 3, value_name = "N")]
    top: usize,
    #[command(flatten)]
    opts: CaptionOpts,
    /// JSON lines output
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Image to decode, preprocess and encode
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// Timed runs
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Untimed warm-up runs
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// JSON output
    #[arg(long)]
    json: bool,
    /// Also time captioning: decoder step latency by past length (batch 1 and --beams) and
    /// whole greedy and beam-search captions of --caption-len tokens
    #[arg(long)]
    caption: bool,
    /// Sequence length for the caption timings (open_clip seq_len, start token included)
    #[arg(long, default_value_t = 21)]
    caption_len: usize,
    /// Beams for the caption timings
    #[arg(long, default_value_t = 6)]
    beams: usize,
    /// Print the image encoder's time per operator kind (with --caption, also the decoder step's)
    #[arg(long)]
    profile: bool,
    /// Decoder steps timed for the step-latency table (past 0 .. N-1)
    #[arg(long, default_value_t = 30)]
    step_len: usize,
}

/// Zero-shot labels and prompt templates, shared by classify and describe.
#[derive(Args, Debug)]
struct LabelArgs {
    /// Comma-separated labels, e.g. "cat,dog,traffic cone"
    #[arg(long, value_name = "A,B,C", conflicts_with = "labels_file")]
    labels: Option<String>,
    /// UTF-8 file with one label per line
    #[arg(long, value_name = "FILE")]
    labels_file: Option<PathBuf>,
    /// Prompt templates, one per line with a {} placeholder (default: the model's own, else open_clip's 80 ImageNet templates)
    #[arg(long, value_name = "FILE")]
    templates: Option<PathBuf>,
}

impl LabelArgs {
    /// The checked labels and templates (before any model is loaded).
    /// `None` templates: the model's defaults ([`Pipeline::default_templates`]).
    fn load(&self) -> Result<(Vec<String>, Option<Templates>)> {
        if self.labels.is_none() && self.labels_file.is_none() {
            anyhow::bail!("give --labels or --labels-file");
        }
        self.load_opt()
    }

    /// Labels may be absent (a head classifies instead): an empty list.
    fn load_opt(&self) -> Result<(Vec<String>, Option<Templates>)> {
        let labels = match (&self.labels, &self.labels_file) {
            (Some(list), _) => classify::parse_label_list(list)?,
            (None, Some(f)) => classify::read_label_file(f)?,
            (None, None) => Vec::new(),
        };
        let templates = match &self.templates {
            Some(f) => Some(Templates::from_file(f)?),
            None => None,
        };
        Ok((labels, templates))
    }
}

#[derive(Args, Debug)]
struct ClassifyArgs {
    /// Image files
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    #[command(flatten)]
    labels: LabelArgs,
    /// How many labels to show per image
    #[arg(long, default_value_t = 5, value_name = "N")]
    top_k: usize,
    /// JSON lines output, one object per image
    #[arg(long)]
    json: bool,
    /// Do not read or write the label-embedding cache
    #[arg(long)]
    no_cache: bool,
    /// A head trained with `coca head train` (with or without zero-shot labels: one encoder pass)
    #[arg(long, value_name = "HEAD.json")]
    head: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum HeadCmd {
    /// Train a head on labelled images: DIR with one folder of images per class, or a list
    /// file of CLASS<TAB>PATH lines
    Train(HeadTrainArgs),
    /// Accuracy and confusion matrix of a head on labelled images (same layouts as train)
    Eval(HeadEvalArgs),
}

#[derive(Args, Debug)]
struct HeadTrainArgs {
    /// Labelled images: a folder of class folders, or a CLASS<TAB>PATH list file
    #[arg(long, value_name = "DIR|LIST")]
    data: PathBuf,
    /// Where to write the head
    #[arg(long, value_name = "HEAD.json")]
    out: PathBuf,
    /// linear (logistic regression, L2 by cross-validation) or prototype (class means)
    /// [default: linear when every class has 2 images or more, else prototype]
    #[arg(long, value_parser = ["linear", "prototype"])]
    kind: Option<String>,
    /// Use at most N images per class (the first N in name order)
    #[arg(long, value_name = "N")]
    shots: Option<usize>,
    /// Most cross-validation folds
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct HeadEvalArgs {
    /// The head
    #[arg(long, value_name = "HEAD.json")]
    head: PathBuf,
    /// Labelled images: a folder of class folders, or a CLASS<TAB>PATH list file
    #[arg(long, value_name = "DIR|LIST")]
    data: PathBuf,
    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct EmbedArgs {
    /// Image files
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// JSON lines output: {"image": ..., "embedding": [...]}
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// JSON output
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // a negative number is read as the option's value, so `--threads -1` is refused as a bad
    // value (clap otherwise takes it for a flag and suggests `-- -1`, which does not work for an
    // option's value)
    fn negatives(c: clap::Command) -> clap::Command {
        c.allow_negative_numbers(true).mut_subcommands(negatives)
    }
    let parsed = negatives(<Cli as clap::CommandFactory>::command()).try_get_matches().and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(&cli.global);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("coca: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, each cause once (a cause whose text the message
/// already ends with is not repeated: our `Io` errors print their OS error, which is also their
/// source), control characters escaped.
fn one_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for c in e.chain() {
        let t = c.to_string();
        if s.is_empty() {
            s = t;
        } else if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
    }
    // control characters (a label's ESC or NUL) are shown escaped, never sent to the terminal
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().map(|io| io.kind() == std::io::ErrorKind::BrokenPipe).unwrap_or(false))
}

fn init_logging(g: &Global) {
    let level = if g.quiet {
        log::LevelFilter::Error
    } else {
        match g.verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            _ => log::LevelFilter::Debug,
        }
    };
    env_logger::Builder::new()
        .filter_level(level)
        .filter_module("tract_core", log::LevelFilter::Warn.min(level))
        .filter_module("tract_onnx", log::LevelFilter::Warn.min(level))
        .filter_module("tract_hir", log::LevelFilter::Warn.min(level))
        .format_timestamp(None)
        .parse_env("COCA_LOG")
        .init();
}

/// The bundle to use: --model / $COCA_MODEL, else the shipped one, looked up from the current
/// folder, then from the executable's repository (target/*/coca), then the source tree.
fn model_dir(g: &Global) -> PathBuf {
    if let Some(m) = &g.model {
        return m.clone();
    }
    let rel = Path::new(coca_edge::DEFAULT_BUNDLE);
    let mut candidates = vec![rel.to_path_buf()];
    if let Ok(exe) = std::env::current_exe() {
        for anc in exe.ancestors().skip(1).take(4) {
            candidates.push(anc.join(rel));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel));
    candidates.iter().find(|c| c.join(coca_edge::bundle::MANIFEST).is_file()).cloned().unwrap_or_else(|| rel.to_path_buf())
}

fn engine_options(g: &Global) -> Result<EngineOptions> {
    match g.threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) if n > model::MAX_THREADS => anyhow::bail!(
            "--threads {n}: at most {} (this machine has {} cores)",
            model::MAX_THREADS,
            std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1)
        ),
        _ => {}
    }
    let board = board(g)?;
    let mut opts = EngineOptions::for_board(board.as_ref().map(|(b, _)| b), g.threads, g.precision.as_deref());
    opts.force_precision = g.force_precision;
    Ok(opts)
}

/// The board profile `--board` names (or detects, for `auto`).
fn board(g: &Global) -> Result<Option<(coca_edge::board::BoardProfile, Option<coca_edge::board::Detected>)>> {
    let Some(name) = &g.board else { return Ok(None) };
    let found = coca_edge::board::BoardProfile::resolve(name)?;
    if name == "auto" {
        match &found {
            Some((p, d)) => log::info!("--board auto: {} ({:?})", p.name, d.as_ref().unwrap()),
            None => log::info!("--board auto: no known board here; using the defaults"),
        }
    }
    Ok(found)
}

fn open_pipeline(g: &Global, cache: bool) -> Result<Pipeline> {
    let dir = model_dir(g);
    let mut opts = if cache { PipelineOptions::with_default_cache() } else { PipelineOptions::default() };
    opts.engine = engine_options(g)?;
    let t0 = std::time::Instant::now();
    let p = Pipeline::open(&dir, opts)?;
    log::info!("loaded {} in {:.2?}", dir.display(), t0.elapsed());
    Ok(p)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Classify(a) => classify_cmd(&cli.global, a),
        Cmd::Embed(a) => embed_cmd(&cli.global, a),
        Cmd::Info(a) => info_cmd(&cli.global, a),
        Cmd::Bench(a) => bench_cmd(&cli.global, a),
        Cmd::Caption(a) => caption_cmd(&cli.global, a),
        Cmd::Describe(a) => describe_cmd(&cli.global, a),
        Cmd::Stream(a) => stream_cmd(&cli.global, a),
        Cmd::Head(HeadCmd::Train(a)) => head_train_cmd(&cli.global, a),
        Cmd::Head(HeadCmd::Eval(a)) => head_eval_cmd(&cli.global, a),
        Cmd::GraphRuns(a) => graph_runs_cmd(&cli.global, a),
    }
}

/// Decode each of `paths` (with the pipeline's limits) and hand it to `f` with its decode time
/// in ms. An image that cannot be read or decoded is reported on stderr and skipped: the other
/// images still get their results (no lost work), and the exit code is 2.
fn each_image(p: &Pipeline, paths: &[PathBuf], mut f: impl FnMut(&Path, &DecodedImage, f64) -> Result<()>) -> Result<ExitCode> {
    let mut failed = false;
    for path in paths {
        let t0 = std::time::Instant::now();
        match coca_edge::vision::load_image(path, &p.options().limits) {
            Ok(img) => f(path, &img, t0.elapsed().as_secs_f64() * 1e3)?,
            Err(e) => {
                eprintln!("coca: {}", e.to_string().split_whitespace().collect::<Vec<_>>().join(" "));
                failed = true;
            }
        }
    }
    Ok(if failed { ExitCode::from(2) } else { ExitCode::SUCCESS })
}

fn classify_cmd(g: &Global, a: ClassifyArgs) -> Result<ExitCode> {
    // check the cheap inputs before loading anything
    let (labels, templates) = a.labels.load_opt()?;
    if labels.is_empty() && a.head.is_none() {
        anyhow::bail!("give --labels, --labels-file or --head");
    }
    if a.top_k == 0 {
        anyhow::bail!("--top-k must be at least 1");
    }
    let p = open_pipeline(g, !a.no_cache)?;
    let head = a.head.as_deref().map(|h| p.load_head(h)).transpose()?;
    let show_progress = std::io::stderr().is_terminal() && !g.quiet;
    let set = if labels.is_empty() {
        None
    } else {
        Some(p.label_set(&labels, &templates.map_or_else(|| p.default_templates(), Ok)?, |done, total| {
            if show_progress {
                eprint!("\rencoding label prompts {done}/{total}");
                if done == total {
                    eprintln!();
                }
            }
        })?)
    };
    let req = FrameRequest { labels: set.as_ref(), head: head.as_ref(), top_k: a.top_k, ..Default::default() };
    let mut out = std::io::stdout().lock();
    each_image(&p, &a.images, |path, img, _| {
        let r = p.process(img, &req)?;
        let (scores, head_scores) = (r.scores, r.head_scores);
        if a.json {
            let mut obj = serde_json::json!({"image": path.display().to_string()});
            if let Some(s) = &scores {
                obj["top"] = serde_json::to_value(s)?;
            }
            if let Some(s) = &head_scores {
                obj["head"] = serde_json::to_value(s)?;
            }
            writeln!(out, "{obj}")?;
        } else {
            writeln!(out, "{}", path.display())?;
            for s in scores.iter().flatten() {
                writeln!(out, "  {:.4}  {}", s.probability, s.label)?;
            }
            for s in head_scores.iter().flatten() {
                writeln!(out, "  {:.4}  {}  (head)", s.probability, s.label)?;
            }
        }
        out.flush()?;
        Ok(())
    })
}

fn head_train_cmd(g: &Global, a: HeadTrainArgs) -> Result<ExitCode> {
    use coca_edge::head::{data::Dataset, TrainOptions};
    let mut ds = Dataset::scan(&a.data)?;
    if let Some(n) = a.shots {
        if n == 0 {
            anyhow::bail!("--shots must be at least 1");
        }
        let mut seen = vec![0usize; ds.classes.len()];
        ds.items.retain(|(_, k)| {
            seen[*k] += 1;
            seen[*k] <= n
        });
    }
    if a.folds < 2 {
        anyhow::bail!("--folds must be at least 2");
    }
    let p = open_pipeline(g, true)?;
    let opts = TrainOptions { kind: a.kind.as_deref().map(str::parse).transpose()?, folds: a.folds, ..Default::default() };
    let show = std::io::stderr().is_terminal() && !g.quiet;
    let t0 = std::time::Instant::now();
    let mut t_embedded = t0;
    let (head, report, emb) = p.train_head(&ds, &opts, |done, total| {
        if show {
            let w = 30 * done / total.max(1);
            eprint!("\rembedding images [{}{}] {done}/{total}", "#".repeat(w), " ".repeat(30 - w));
            if done == total {
                eprintln!();
            }
        }
        if done == total {
            t_embedded = std::time::Instant::now();
        }
    })?;
    let train_s = t_embedded.elapsed().as_secs_f64();
    head.save(&a.out)?;
    for (path, why) in emb.skipped.iter().take(5) {
        log::warn!("skipped {}: {why}", path.display());
    }
    if !emb.skipped.is_empty() && !g.quiet {
        eprintln!("warning: skipped {} unreadable image(s) of {} (first: {})", emb.skipped.len(), ds.items.len(), emb.skipped[0].0.display());
    }
    let bytes = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    if a.json {
        let obj = serde_json::json!({
            "head": a.out.display().to_string(), "bytes": bytes, "kind": report.kind, "classes": head.classes,
            "images_per_class": head.images_per_class, "skipped": emb.skipped.len(), "cached_embeddings": emb.cached,
            "l2": report.l2, "cv_accuracy": report.cv_accuracy, "folds": report.folds, "cv_by_l2": report.cv_by_l2,
            "confusion": report.confusion, "train_seconds": train_s, "total_seconds": t0.elapsed().as_secs_f64(),
        });
        writeln!(std::io::stdout(), "{obj}")?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{} head, {} classes, {} images ({} skipped, {} embeddings from the cache)",
            serde_json::to_value(report.kind)?.as_str().unwrap_or("?"),
            head.classes.len(),
            emb.x.len(),
            emb.skipped.len(),
            emb.cached
        )?;
        match report.cv_accuracy {
            Some(acc) => writeln!(
                out,
                "cross-validated accuracy {:.1}% ({} folds{})",
                acc * 100.0,
                report.folds,
                report.l2.map(|l| format!(", L2 {l}")).unwrap_or_default()
            )?,
            None => writeln!(out, "no cross-validation: a class has a single image")?,
        }
        if !report.confusion.is_empty() {
            print_confusion(&mut out, &head.classes, &report.confusion)?;
        }
        writeln!(out, "trained in {train_s:.2} s after embedding; wrote {} ({bytes} bytes)", a.out.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_confusion(out: &mut impl Write, classes: &[String], confusion: &[Vec<usize>]) -> Result<()> {
    writeln!(out, "confusion (rows: true class, columns: predicted, in class order):")?;
    let w = classes.iter().map(|c| c.chars().count()).max().unwrap_or(4).min(20);
    for (i, row) in confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|n| format!("{n:>4}")).collect();
        writeln!(out, "  {:>w$} {}", classes[i].chars().take(20).collect::<String>(), cells.join(""))?;
    }
    Ok(())
}

fn head_eval_cmd(g: &Global, a: HeadEvalArgs) -> Result<ExitCode> {
    use coca_edge::head::data::Dataset;
    let ds = Dataset::scan(&a.data)?;
    let p = open_pipeline(g, true)?;
    let head = p.load_head(&a.head)?;
    let map: Vec<Option<usize>> = ds.classes.iter().map(|c| head.classes.iter().position(|h| h == c)).collect();
    if let Some(i) = map.iter().position(|m| m.is_none()) {
        anyhow::bail!("{}: class '{}' is not one of the head's classes ({})", a.data.display(), ds.classes[i], head.classes.join(", "));
    }
    let emb = p.embed_dataset(&ds, |_, _| {})?;
    let c = head.classes.len();
    let mut confusion = vec![vec![0usize; c]; c];
    for (x, &y) in emb.x.iter().zip(&emb.y) {
        let pred = head.classify(x, 1)?[0].index;
        confusion[map[y].unwrap()][pred] += 1;
    }
    let correct: usize = (0..c).map(|k| confusion[k][k]).sum();
    let acc = correct as f64 / emb.x.len().max(1) as f64;
    if a.json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::json!({"accuracy": acc, "images": emb.x.len(), "skipped": emb.skipped.len(), "classes": head.classes, "confusion": confusion})
        )?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "accuracy {:.1}% on {} images ({} skipped)", acc * 100.0, emb.x.len(), emb.skipped.len())?;
        print_confusion(&mut out, &head.classes, &confusion)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn embed_cmd(g: &Global, a: EmbedArgs) -> Result<ExitCode> {
    let p = open_pipeline(g, true)?;
    let mut out = std::io::stdout().lock();
    each_image(&p, &a.images, |path, img, _| {
        let embedding = p.process(img, &FrameRequest::default())?.features.embedding;
        if a.json {
            let obj = serde_json::json!({"image": path.display().to_string(), "embedding": embedding});
            writeln!(out, "{obj}")?;
        } else {
            let vals: Vec<String> = embedding.iter().map(|v| format!("{v:e}")).collect();
            writeln!(out, "{}\t{}", path.display(), vals.join(" "))?;
        }
        out.flush()?;
        Ok(())
    })
}

/// `coca graph-runs`: fixed, deterministic inputs (a smooth synthetic image, its captioning
/// tokens, zero ids and mask), so two processes that differ only in --runs differ only by the
/// graph's own work. Prints one checksum line per run.
fn graph_runs_cmd(g: &Global, a: GraphRunsArgs) -> Result<ExitCode> {
    let p = open_pipeline(g, true)?;
    let size = p.bundle().manifest().image.size as usize;
    let chw: Vec<f32> = (0..3 * size * size).map(|i| ((i % 97) as f32 / 48.0 - 1.0) * 0.8).collect();
    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
    let mut out = std::io::stdout().lock();
    if a.graph == "image_encoder" {
        for _ in 0..a.runs {
            let f = p.embed_preprocessed(&chw)?;
            writeln!(out, "{:e}", sum(&f.embedding) + sum(&f.tokens))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let dec = p.decoder()?;
    let features = p.embed_preprocessed(&chw)?;
    if a.graph == "cross_kv" {
        for _ in 0..a.runs {
            dec.cross_kv(&features.tokens)?;
            writeln!(out, "cross_kv")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (b, past) = (a.batch.max(1), a.past);
    let cross = dec.cross_kv(&features.tokens)?;
    let mut cache = dec.empty_cache(b);
    if past > 0 {
        dec.step(&mut cache, &vec![1i64; b * past], past, &vec![0f32; b * past], &cross)?;
    }
    for _ in 0..a.runs {
        let mut c = cache.clone();
        let logits = dec.step(&mut c, &vec![1i64; b], 1, &vec![0f32; b * (past + 1)], &cross)?;
        writeln!(out, "{:e}", sum(&logits))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn info_cmd(g: &Global, a: InfoArgs) -> Result<ExitCode> {
    let opts = engine_options(g)?;
    let p = open_pipeline(g, true)?;
    let b = p.bundle();
    let m = b.manifest();
    let graphs: Vec<serde_json::Value> = m
        .graphs
        .iter()
        .map(|(name, gs)| {
            let files: serde_json::Map<String, serde_json::Value> = gs
                .precisions
                .iter()
                .map(|(prec, f)| (prec.clone(), serde_json::json!({"file": f, "bytes": m.files.get(f).map(|s| s.size)})))
                .collect();
            serde_json::json!({
                "name": name,
                "precisions": files,
                "inputs": gs.inputs.iter().map(|t| format!("{} {} [{}]", t.name, t.dtype, t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","))).collect::<Vec<_>>(),
                "outputs": gs.outputs.iter().map(|t| format!("{} {} [{}]", t.name, t.dtype, t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","))).collect::<Vec<_>>(),
            })
        })
        .collect();
    // the kernel tract picks for a product the size of the model's linear layers
    let kernels = model::kernel_report(m.dims.token_dim, m.dims.token_dim, 64);
    let found = board(g)?;
    let detected = |d: &Option<coca_edge::board::Detected>| match d {
        Some(coca_edge::board::Detected::Model(m)) => format!("detected from the device tree: {m}"),
        Some(coca_edge::board::Detected::CpuPart(c)) => format!("detected from the CPU part {c}"),
        None => "named".to_string(),
    };
    let board_json = found.as_ref().map(|(p, d)| serde_json::json!({"name": p.name, "how": detected(d), "description": p.description}));
    let board_line = match (&found, g.board.as_deref()) {
        (Some((p, d)), _) => format!("{} ({}; {})", p.name, p.description, detected(d)),
        (None, Some("auto")) => "none detected (not a known board; defaults apply)".to_string(),
        (None, _) => "none (--board NAME or auto)".to_string(),
    };
    // where the precision came from, and why a board chose it
    let precision_why = match (&g.precision, &found) {
        (Some(_), _) => "--precision".to_string(),
        (None, Some((bp, _))) => format!("board {} default: {}", bp.name, bp.why),
        (None, None) => "the default (no --precision, no board)".to_string(),
    };
    let info = serde_json::json!({
        "bundle": b.dir().display().to_string(),
        "name": m.name,
        "id": b.id(),
        "source": m.source.get("weights").cloned().unwrap_or_default(),
        "image_size": m.image.size,
        "embed_dim": m.dims.embed_dim,
        "caption_tokens": m.dims.caption_tokens,
        "context_length": m.text.context_length,
        "logit_scale": m.logit_scale,
        "precision": p.image_encoder().graph().precision(),
        "precision_asked": opts.precision,
        "precision_why": precision_why,
        "f16_usable": coca_edge::model::check_precision("f16", false).is_ok(),
        "threads": opts.effective_threads(),
        "image_encoder_load_s": p.image_encoder().graph().load_time().as_secs_f64(),
        "captioning": m.decoder.as_ref().map(|d| serde_json::json!({
            "self_layers": d.self_layers, "cross_layers": d.cross_layers, "heads": d.heads, "head_dim": d.head_dim,
            "max_positions": d.max_positions,
            "kv_cache_bytes_per_beam_token": d.self_layers * 2 * d.heads * d.head_dim * 4,
        })),
        "board": board_json,
        "cpu": std::env::consts::ARCH,
        "cpu_features": model::cpu_features(),
        "kernels": kernels,
        "coca_edge_version": env!("CARGO_PKG_VERSION"),
        "graphs": graphs,
    });
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{info}")?;
    } else {
        writeln!(out, "bundle        {} ({}, id {})", b.dir().display(), m.name, b.id())?;
        writeln!(out, "weights       {}", info["source"].as_str().unwrap_or("?"))?;
        writeln!(out, "image         {0}x{0}, embed_dim {1}, {2} captioning tokens", m.image.size, m.dims.embed_dim, m.dims.caption_tokens)?;
        writeln!(out, "text          context {}, logit_scale {:.4}", m.text.context_length, m.logit_scale)?;
        let f16 = if coca_edge::model::check_precision("f16", false).is_ok() {
            "f16 runs on fp16 kernels here"
        } else {
            "f16 declined here: no fp16 arithmetic; --force-precision overrides"
        };
        let loaded = p.image_encoder().graph().precision();
        let fell_back = if loaded != opts.precision { format!(", {} asked but not in this bundle or declined", opts.precision) } else { String::new() };
        writeln!(out, "precision     {loaded} ({precision_why}{fell_back}; {f16})")?;
        writeln!(out, "threads       {}", opts.effective_threads())?;
        writeln!(out, "board         {}", board_line)?;
        writeln!(out, "cpu           {} [{}]", std::env::consts::ARCH, model::cpu_features().join(" "))?;
        writeln!(
            out,
            "kernels       tract ISA {} ({}), matmul f32 {}, f16 {}",
            kernels.level,
            kernels.isa,
            kernels.matmul_f32.as_deref().unwrap_or("none"),
            kernels.matmul_f16.as_deref().unwrap_or("none")
        )?;
        writeln!(out, "load          image_encoder {:.2?}", p.image_encoder().graph().load_time())?;
        match &m.decoder {
            Some(d) => writeln!(
                out,
                "captioning    {} self-attention + {} cross-attention layers, KV cache {} bytes per beam per token ({:.1} MB for 6 beams x 30 tokens)",
                d.self_layers,
                d.cross_layers,
                d.self_layers * 2 * d.heads * d.head_dim * 4,
                (d.self_layers * 2 * d.heads * d.head_dim * 4 * 6 * 30) as f64 / 1e6
            )?,
            None => writeln!(out, "captioning    not in this bundle (no decoder graphs)")?,
        }
        for (name, gs) in &m.graphs {
            let precs: Vec<String> =
                gs.precisions.iter().map(|(prec, f)| format!("{prec}: {f} ({:.1} MB)", m.files.get(f).map(|s| s.size).unwrap_or(0) as f64 / 1e6)).collect();
            writeln!(out, "graph         {name}: {}", precs.join(", "))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn median_ms(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident memory of this process (Linux: VmHWM), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

fn bench_cmd(g: &Global, a: BenchArgs) -> Result<ExitCode> {
    if a.runs == 0 {
        anyhow::bail!("--runs must be at least 1");
    }
    let opts = engine_options(g)?;
    let t0 = std::time::Instant::now();
    let p = open_pipeline(g, true)?;
    let load_s = t0.elapsed().as_secs_f64();
    let bytes = std::fs::read(&a.image).map_err(|e| anyhow::anyhow!("{}: {e}", a.image.display()))?;
    let name = a.image.display().to_string();
    let limits = p.options().limits;
    let (mut dec, mut pre, mut enc) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.warmup + a.runs {
        let t = std::time::Instant::now();
        let img = coca_edge::vision::decode_image(&bytes, &name, &limits)?;
        let t1 = std::time::Instant::now();
        let r = p.process(&img, &FrameRequest::default())?;
        if i >= a.warmup {
            dec.push((t1 - t).as_secs_f64() * 1e3);
            pre.push(r.timings.preprocess_ms);
            enc.push(r.timings.encoder_ms);
        }
    }
    let all = enc.clone();
    let caption = if a.caption { Some(bench_caption(&p, &bytes, &name, &a)?) } else { None };
    if a.profile {
        let img = coca_edge::vision::decode_image(&bytes, &name, &limits)?;
        let prof = p.image_encoder().profile(&p.preprocess(&img), a.runs.max(1))?;
        let total: f64 = prof.iter().map(|x| x.1).sum();
        eprintln!("image encoder per operator kind (ms per run, {} runs; sum {total:.1} ms):", a.runs.max(1));
        for (op, ms, n) in prof.iter().take(20) {
            eprintln!("  {ms:8.2} ms {:5.1}%  {n:4}x  {op}", 100.0 * ms / total);
        }
        if a.caption {
            let dec = p.decoder()?;
            for b in [1, a.beams.max(1)] {
                let prof = dec.profile_step(b, 10, a.runs.max(1))?;
                let total: f64 = prof.iter().map(|x| x.1).sum();
                eprintln!("decoder step, batch {b}, 10 tokens cached, per operator kind (ms per step; sum {total:.1} ms):");
                for (op, ms, n) in prof.iter().take(12) {
                    eprintln!("  {ms:8.2} ms {:5.1}%  {n:4}x  {op}", 100.0 * ms / total);
                }
            }
        }
    }
    let m = p.bundle().manifest();
    let graph_bytes: u64 =
        m.graphs.get("image_encoder").and_then(|g| g.precisions.get(&opts.precision)).and_then(|f| m.files.get(f)).map(|f| f.size).unwrap_or(0);
    let peak_rss = peak_rss_bytes();
    let r = serde_json::json!({
        "caption": caption,
        "graph_bytes_loaded": graph_bytes,
        "peak_rss_bytes": peak_rss,
        "peak_rss_over_graph_bytes": peak_rss.map(|r| r as f64 / graph_bytes.max(1) as f64),
        "model": p.bundle().manifest().name,
        "threads": opts.effective_threads(),
        "runs": a.runs,
        "warmup": a.warmup,
        "load_s": load_s,
        "decode_ms_median": median_ms(&mut dec),
        "preprocess_ms_median": median_ms(&mut pre),
        "encoder_ms_median": median_ms(&mut enc),
        "encoder_ms": all,
    });
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{r}")?;
    } else {
        writeln!(
            out,
            "model {} | threads {} | load {:.2} s | peak RSS {:.0} MB for {:.0} MB of image graph",
            r["model"].as_str().unwrap_or("?"),
            r["threads"],
            load_s,
            peak_rss.unwrap_or(0) as f64 / 1e6,
            graph_bytes as f64 / 1e6
        )?;
        writeln!(
            out,
            "median of {} runs: decode {:.2} ms, preprocess {:.2} ms, encoder {:.2} ms",
            a.runs,
            r["decode_ms_median"].as_f64().unwrap_or(0.0),
            r["preprocess_ms_median"].as_f64().unwrap_or(0.0),
            r["encoder_ms_median"].as_f64().unwrap_or(0.0)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn caption_cmd(g: &Global, a: CaptionArgs) -> Result<ExitCode> {
    let p = open_pipeline(g, true)?;
    let opts = a.opts.to_options(&p);
    let decoder = p.decoder()?;
    opts.validate(decoder.dims().max_positions)?;
    let req = FrameRequest { caption: Some(&opts), ..Default::default() };
    let mut out = std::io::stdout().lock();
    each_image(&p, &a.images, |path, img, _| {
        let c = p.process(img, &req)?.caption.context("no caption")?;
        if a.json {
            writeln!(out, "{}", serde_json::json!({"image": path.display().to_string(), "caption": c.text, "ids": c.ids, "score": c.score}))?;
        } else {
            writeln!(out, "{}\t{}", path.display(), c.text)?;
        }
        out.flush()?;
        Ok(())
    })
}

fn describe_cmd(g: &Global, a: DescribeArgs) -> Result<ExitCode> {
    let (labels, templates) = a.labels.load()?;
    let p = open_pipeline(g, true)?;
    let opts = a.opts.to_options(&p);
    opts.validate(p.decoder()?.dims().max_positions)?;
    let set = p.label_set(&labels, &templates.map_or_else(|| p.default_templates(), Ok)?, |_, _| {})?;
    let req = FrameRequest { labels: Some(&set), top_k: a.top, caption: Some(&opts), ..Default::default() };
    let mut out = std::io::stdout().lock();
    each_image(&p, &a.images, |path, img, decode_ms| {
        let r = p.process(img, &req)?;
        let scores = r.scores.unwrap_or_default();
        let c = r.caption.context("no caption")?;
        let t = r.timings;
        let caption_ms = t.caption_ms.unwrap_or_default();
        let timings = serde_json::json!({"decode_ms": decode_ms, "preprocess_ms": t.preprocess_ms, "encoder_ms": t.encoder_ms,
            "classify_ms": t.classify_ms, "caption_ms": caption_ms});
        if a.json {
            writeln!(out, "{}", serde_json::json!({"image": path.display().to_string(), "top": scores, "caption": c.text, "ids": c.ids, "timings": timings}))?;
        } else {
            writeln!(out, "{}", path.display())?;
            writeln!(out, "  caption: {}", c.text)?;
            for s in &scores {
                writeln!(out, "  {:.4}  {}", s.probability, s.label)?;
            }
            writeln!(
                out,
                "  timings: decode {:.1} ms, preprocess {:.1} ms, encoder {:.1} ms, classify {:.2} ms, caption {:.1} ms",
                decode_ms, t.preprocess_ms, t.encoder_ms, t.classify_ms, caption_ms
            )?;
        }
        out.flush()?;
        Ok(())
    })
}

/// Decoder timings: per-step latency by past length at batch 1 and `beams`, whole captions.
fn bench_caption(p: &Pipeline, bytes: &[u8], name: &str, a: &BenchArgs) -> Result<serde_json::Value> {
    use coca_edge::caption::{CaptionOptions, Search};
    let img = coca_edge::vision::decode_image(bytes, name, &p.options().limits)?;
    let feats = p.process(&img, &FrameRequest::default())?.features;
    let dec = p.decoder()?;
    let steps = a.step_len.clamp(1, dec.dims().max_positions);
    let sot = p.bundle().manifest().text.sot as i64;
    let mut step_ms = serde_json::Map::new();
    for b in [1, a.beams] {
        let mut per_past: Vec<Vec<f64>> = vec![Vec::new(); steps];
        for rep in 0..a.warmup + a.runs {
            let cross = dec.cross_kv(&feats.tokens)?;
            let mut cache = dec.empty_cache(b);
            for (past, slot) in per_past.iter_mut().enumerate() {
                let ids = vec![sot; b];
                let mask = vec![0f32; b * (past + 1)];
                let t = std::time::Instant::now();
                dec.step(&mut cache, &ids, 1, &mask, &cross)?;
                if rep >= a.warmup {
                    slot.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let medians: Vec<f64> = per_past.iter_mut().map(|v| median_ms(v)).collect();
        step_ms.insert(format!("batch{b}"), serde_json::json!(medians));
    }
    let runs = a.runs.clamp(1, 5);
    let mut whole = serde_json::Map::new();
    for (label, search) in [("greedy", Search::Greedy), ("beam", Search::Beam { beams: a.beams, groups: if a.beams.is_multiple_of(3) { 3 } else { 1 } })] {
        let opts = CaptionOptions { search, max_tokens: a.caption_len, ..Default::default() };
        let mut ts = Vec::new();
        let mut tokens = 0;
        for _ in 0..runs + 1 {
            let t = std::time::Instant::now();
            let c = p.caption(&feats, &opts, |_, _| {})?;
            ts.push(t.elapsed().as_secs_f64() * 1e3);
            tokens = c.ids.len();
        }
        ts.remove(0); // first run loads nothing more but warms caches
        whole.insert(label.to_string(), serde_json::json!({"ms_median": median_ms(&mut ts), "sequence_len": tokens}));
    }
    Ok(serde_json::json!({"step_ms_by_past": step_ms, "whole_caption": whole, "cache_bytes_per_beam_token": dec.cache_bytes_per_token()}))
}

fn parse_size(spec: &str, what: &str) -> Result<(u32, u32)> {
    let bad = || anyhow::anyhow!("{what} '{spec}': expected WIDTHxHEIGHT, e.g. 640x480");
    let (w, h) = spec.split_once('x').ok_or_else(bad)?;
    let (w, h): (u32, u32) = (w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?);
    if w == 0 || h == 0 || w > 16384 || h > 16384 {
        anyhow::bail!("{what} '{spec}': size out of range");
    }
    Ok((w, h))
}

fn stream_cmd(g: &Global, a: StreamArgs) -> Result<ExitCode> {
    use coca_edge::source::{camera, SourceOptions};
    use coca_edge::stream::{self, preview::Preview, save::SaveTo, JsonLines, StreamOptions};
    let (labels, templates) = a.labels.load_opt()?;
    if labels.is_empty() && a.head.is_none() {
        anyhow::bail!("give --labels, --labels-file or --head");
    }
    let raw = a.input_format.as_deref().map(coca_edge::source::parse_input_format).transpose()?;
    if let Some(t) = a.caption_on_change {
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            anyhow::bail!("--caption-on-change {t}: use a cosine distance in 0..2");
        }
    }
    let watchdog = match a.watchdog {
        Some(s) if !(s.is_finite() && s > 0.0 && s < 1e6) => anyhow::bail!("--watchdog {s}: use a number of seconds above 0"),
        Some(s) => Some(std::time::Duration::from_secs_f64(s)),
        None => None,
    };
    // a board profile gives the camera defaults; explicit options win
    let board_cam = if camera::camera_path(&a.input).is_some() { board(g)?.map(|(b, _)| b.camera) } else { None };
    let mut cam = camera::CameraRequest::default();
    if let Some(f) = a.camera_format.as_deref().or(board_cam.as_ref().map(|c| c.format.as_str())) {
        cam.formats = camera::parse_camera_formats(f)?;
    }
    if let Some(sz) = a.camera_size.as_deref().or(board_cam.as_ref().map(|c| c.size.as_str())) {
        let (w, h) = parse_size(sz, "--camera-size")?;
        (cam.width, cam.height) = (Some(w), Some(h));
    }
    cam.fps = a.camera_fps.or(board_cam.as_ref().map(|c| c.fps));
    if cam.fps == Some(0) {
        anyhow::bail!("--camera-fps 0: use a rate above 0");
    }
    // outputs first: a bad --save or a busy --preview port fails before the model loads
    let save = a.save.as_deref().map(SaveTo::create).transpose()?;
    let preview = a.preview.as_deref().map(|addr| Preview::start_with(addr, a.teach.clone())).transpose()?;
    if let Some(pv) = &preview {
        if !g.quiet {
            eprintln!("preview: http://{}/", pv.addr());
        }
    }
    let p = open_pipeline(g, true)?;
    let source_opts = SourceOptions { raw, limits: p.options().limits, camera: cam, ..Default::default() };
    let source = coca_edge::source::open_source_with(&a.input, &source_opts)?;
    let set = if labels.is_empty() { None } else { Some(p.label_set(&labels, &templates.map_or_else(|| p.default_templates(), Ok)?, |_, _| {})?) };
    let head = a.head.as_deref().map(|h| p.load_head(h)).transpose()?;
    let opts = StreamOptions {
        head,
        every_frame: a.every_frame,
        caption_every: a.caption_every,
        caption_on_change: a.caption_on_change,
        caption: a.opts.to_options(&p),
        top_k: a.top,
        max_frames: a.max_frames,
        watchdog,
    };
    static SHUTDOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| SHUTDOWN.store(true, std::sync::atomic::Ordering::SeqCst));
    let status = std::io::stderr().is_terminal() && !g.quiet;
    // the JSON lines first, then the files, the preview and the terminal's status line
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(JsonLines::new(std::io::stdout().lock(), "stdout"))];
    if let Some(s) = save {
        sinks.push(Box::new(s));
    }
    if let Some(pv) = preview {
        sinks.push(Box::new(pv));
    }
    if status {
        sinks.push(Box::new(StatusLine));
    }
    let summary = stream::run(&p, source, set.as_ref(), &opts, &SHUTDOWN, &mut sinks)?;
    // every frame bad, none processed: an error, as `classify` on the same files (the summary
    // line with its counts was written first)
    let c = &summary.counters;
    if c.processed == 0 && c.bad_frames > 0 {
        anyhow::bail!("{}: no frame could be processed ({} bad frames)", summary.source, c.bad_frames);
    }
    Ok(ExitCode::SUCCESS)
}

/// `coca stream` on a terminal: one status line on stderr, rewritten for every frame, and the
/// summary in words at the end.
struct StatusLine;

impl Sink for StatusLine {
    fn frame(&mut self, ev: &FrameEvent<'_>) -> coca_edge::Result<()> {
        let (r, c) = (ev.report, &ev.report.counters);
        eprint!(
            "\rframe {} | {:.1} fps | processed {} | dropped {} (driver {}) | reconnects {} | encoder {:.0} ms   ",
            r.frame,
            ev.fps.unwrap_or(0.0),
            c.processed,
            c.dropped,
            c.driver_dropped,
            c.reconnects,
            r.latency.encoder_ms
        );
        Ok(())
    }

    fn finish(&mut self, summary: &Summary) -> coca_edge::Result<()> {
        let c = &summary.counters;
        eprintln!();
        eprintln!(
            "{}: {} captured, {} processed, {} dropped, {} dropped by the driver, {} bad, {} reconnects, {:.1} frames/s",
            summary.source, c.captured, c.processed, c.dropped, c.driver_dropped, c.bad_frames, c.reconnects, summary.fps
        );
        Ok(())
    }
}
