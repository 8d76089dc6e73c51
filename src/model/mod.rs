//! The inference engine: the only module that names tract types.
//!
//! Graphs come from a [`Bundle`], are checked against its manifest (input/output names, dtypes,
//! ranks, fixed sizes), fixed to a concrete batch, optimised once, and run with a per-graph
//! executor so `--threads` drives tract's multithreaded matmuls.
//!
//! Mirrors the graphs written by `models/export/export.py` (open_clip 3.3.0 CoCa):
//! `image_encoder` = `CoCa.encode_image` + the pooler's captioning tokens, `text_encoder` =
//! `CoCa.encode_text`, both L2-normalised.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::bundle::{Bundle, Dim, GraphSpec, TensorSpec};

mod attn;
mod f32mm;
mod kv;
mod ops;
mod product;
mod q8;
#[cfg(test)]
mod test_proto;
mod w8;

pub use crate::kernels::kernel_set;

/// Which of our rewrites a graph load makes (from [`EngineOptions::tract_ops`], and whether the
/// kernels of this CPU make our f32 products worth it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rewrites {
    /// our ops and rewrites at all (false: tract's own translations only)
    pub ours: bool,
    /// products by constant f32 weights and attention through our kernels ([`f32mm`], [`attn`])
    pub f32_products: bool,
    /// statically quantised int8 products (sym-mmi) through our kernels ([`q8`])
    pub int8_products: bool,
}

impl Rewrites {
    /// What `opts` asks for on this CPU.
    pub fn of(opts: &EngineOptions) -> Rewrites {
        let ours = !opts.tract_ops;
        Rewrites { ours, f32_products: ours && f32mm::worth_fusing(), int8_products: ours && !opts.tract_int8 && crate::kernels::kernels().fuse_q8_static }
    }
}

/// tract's ONNX front end, with our replacements for the ops it runs slowly ([`ops`]) when
/// `ours`.
fn onnx(ours: bool) -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    if ours {
        ops::register(&mut onnx);
    }
    onnx
}

/// Parse an ONNX file with [`onnx`], int8-weight products fused first ([`w8`]), and with
/// `rewrites.f32_products` the products by constant f32 weights ([`f32mm`]) and the attention
/// products ([`attn`]) run by our kernels.
///
/// The protobuf decoder copies every weight out of the file, and tract builds its tensors from
/// those copies while the protobuf is alive: twice the weights in memory at once. So the large
/// float weights are moved out of the protobuf first and handed to tract one at a time through
/// its external-data hook ([`MovedWeights`]): each copy is freed as its tensor is made.
fn load_onnx_with(path: &Path, rewrites: Rewrites) -> TractResult<InferenceModel> {
    load_onnx_rewritten(path, rewrites, None).map(|(m, _)| m)
}

/// [`load_onnx_with`], with `graph_rewrite` made first where it applies (says whether it was).
fn load_onnx_rewritten(path: &Path, rewrites: Rewrites, graph_rewrite: Option<&GraphRewrite>) -> TractResult<(InferenceModel, bool)> {
    let mut onnx = onnx(rewrites.ours);
    let mut proto = read_proto(path)?;
    // (first: it reads the attention chains as the export wrote them)
    let rewritten = match graph_rewrite {
        Some(g) => (g.apply)(&mut proto, rewrites.ours && g.spec.is_some()),
        None => false,
    };
    // (lives until the protobuf is parsed: it holds the fused products' packed weights)
    let _fused = rewrites.ours.then(|| {
        let fused = w8::fuse_weight_dequant(&mut proto);
        if fused.products > 0 {
            log::debug!("{}: {} products with int8 weights", path.display(), fused.products);
        }
        fused
    });
    let _fused_q8 = rewrites.ours.then(|| {
        let fused = q8::fuse_int8_products(&mut proto, rewrites.int8_products);
        if fused.products > 0 {
            log::debug!("{}: {} products with int8 weights and activations through our kernels", path.display(), fused.products);
        }
        fused
    });
    let _fused_f32 = (rewrites.ours && rewrites.f32_products).then(|| {
        let fused = f32mm::fuse_f32_weights(&mut proto);
        let attention = attn::fuse_attention(&mut proto);
        if fused.products > 0 || attention > 0 {
            log::debug!(
                "{}: {} products with f32 weights ({} with their bias), {attention} attention products",
                path.display(),
                fused.products,
                fused.with_bias
            );
        }
        fused
    });
    if let Some(moved) = MovedWeights::take(&mut proto, path) {
        onnx.provider = Arc::new(moved);
    }
    let dir = path.parent().and_then(|d| d.to_str());
    let parsed = onnx.parse(&proto, dir)?;
    drop(proto);
    if !parsed.unresolved_inputs.is_empty() {
        anyhow::bail!("could not resolve inputs at top level: {:?}", parsed.unresolved_inputs);
    }
    Ok((parsed.model, rewritten))
}

/// A look at one graph of a bundle as it is parsed, and a rewrite of it beyond the generic ones
/// (made only with our ops), with the interface the rewritten graph has (the manifest
/// describes the file on disk).
pub(crate) struct GraphRewrite<'a> {
    /// reads the protobuf (always) and, when its second argument says so, rewrites it; says
    /// whether it did
    pub apply: &'a dyn Fn(&mut tract_onnx::pb::ModelProto, bool) -> bool,
    /// the inputs and outputs once rewritten (`None`: no rewrite, only the look)
    pub spec: Option<GraphSpec>,
}

/// tract's optimisation, then (when `ours`) our attention op's operands read where tract's
/// layout ops would have copied them from ([`attn::absorb_layouts`]), residual adds made as our
/// products store their tiles ([`f32mm::fuse_residual_adds`]) and GELUs split over the threads
/// ([`ops::parallel_gelu`]).
fn optimize(typed: TypedModel, ours: bool) -> TractResult<TypedModel> {
    let mut optimized = typed.into_optimized()?;
    if !ours {
        return Ok(optimized);
    }
    let absorbed = attn::absorb_layouts(&mut optimized)?;
    let residuals = f32mm::fuse_residual_adds(&mut optimized)?;
    let gelus = ops::parallel_gelu(&mut optimized)?;
    if absorbed + residuals + gelus > 0 {
        log::debug!("{absorbed} attention ops read their operands in place, {residuals} residual adds made with their product, {gelus} GELUs over the threads");
    }
    Ok(optimized)
}

use crate::error::{Error, Result};

/// A standalone ONNX graph with f32 inputs and outputs (a trained head's graph, test graphs),
/// parsed with our op replacements and int8-weight products unless
/// [`EngineOptions::tract_ops`], and optimised by tract. Its f32 products stay tract's: such
/// graphs are small.
pub struct OnnxGraph {
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
}

impl std::fmt::Debug for OnnxGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxGraph").field("path", &self.path).finish()
    }
}

impl OnnxGraph {
    /// Load `path`; `inputs`, when given, fixes the f32 shape of each input in order (else the
    /// graph's own declarations stand).
    pub fn load(path: &Path, inputs: Option<&[&[usize]]>, opts: &EngineOptions) -> Result<OnnxGraph> {
        let engine = |e: TractError| Error::Engine { what: path.display().to_string(), message: crate::error::one_line(&format!("{e:#}")) };
        let mut model = load_onnx_with(path, Rewrites { ours: !opts.tract_ops, f32_products: false, int8_products: false }).map_err(engine)?;
        for (ix, shape) in inputs.unwrap_or(&[]).iter().enumerate() {
            model = model.with_input_fact(ix, f32::fact(*shape).into()).map_err(engine)?;
        }
        let plan = model.into_optimized().and_then(|m| m.into_runnable()).map_err(engine)?;
        Ok(OnnxGraph { path: path.to_path_buf(), plan })
    }

    /// How many ops of tract's op name `op` the optimised graph holds (e.g. "MatMulW8").
    pub fn op_count(&self, op: &str) -> usize {
        self.plan.model().nodes().iter().filter(|n| n.op().name() == op).count()
    }

    /// Run with f32 inputs (shape, row-major values); every output as f32 values, row-major.
    pub fn run(&self, inputs: &[(&[usize], &[f32])]) -> Result<Vec<Vec<f32>>> {
        let what = || self.path.display().to_string();
        let mut tv: TVec<TValue> = tvec!();
        for (shape, values) in inputs {
            tv.push(Tensor::from_shape(shape, values).map_err(|e| Error::engine(format!("{}: input", what()), e))?.into_tvalue());
        }
        let out = self.plan.run(tv).map_err(|e| Error::engine(what(), e))?;
        out.iter().map(|t| Ok(f32_output(t, &what())?.to_vec())).collect()
    }
}

/// Decode an ONNX protobuf from a file through a 1 MB window. tract's own reader maps the file
/// whole, and every page the decoder has read stays resident until the decoded copy is
/// complete: the weights twice at the peak.
fn read_proto(path: &Path) -> TractResult<tract_onnx::pb::ModelProto> {
    use prost::Message;
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let len = file.metadata()?.len() as usize;
    let mut buf = FileWindow { file, window: vec![0; 1 << 20], start: 0, end: 0, remaining: len, error: None };
    buf.fill();
    let decoded = tract_onnx::pb::ModelProto::decode(&mut buf);
    if let Some(e) = buf.error {
        anyhow::bail!("reading {}: {e}", path.display());
    }
    Ok(decoded?)
}

/// A file as a [`bytes::Buf`], read sequentially through a window.
struct FileWindow {
    file: std::fs::File,
    window: Vec<u8>,
    start: usize,
    end: usize,
    remaining: usize,
    error: Option<std::io::Error>,
}

impl FileWindow {
    /// Refill the window once it is consumed (an I/O error ends the data and is kept).
    fn fill(&mut self) {
        use std::io::Read;
        while self.start == self.end && self.remaining > 0 && self.error.is_none() {
            let want = self.window.len().min(self.remaining);
            match self.file.read(&mut self.window[..want]) {
                Ok(0) => self.error = Some(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shorter than its size")),
                Ok(n) => (self.start, self.end) = (0, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => self.error = Some(e),
            }
        }
        if self.error.is_some() {
            self.remaining = self.end - self.start;
        }
    }
}

impl bytes::Buf for FileWindow {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        &self.window[self.start..self.end]
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of the file");
        while cnt > 0 {
            let step = cnt.min(self.end - self.start);
            self.start += step;
            self.remaining -= step;
            cnt -= step;
            self.fill();
            if self.start == self.end && cnt > 0 && self.remaining == 0 {
                break;
            }
        }
    }
}

/// Weights of at least this many bytes are moved out of the protobuf ([`load_onnx_with`]).
const MOVE_BYTES: usize = 1 << 16;
/// Offsets at or above this name moved weights (no real file is that large).
const MOVED_BASE: u64 = 1 << 40;

/// Large weights taken out of a decoded protobuf. Each is marked as external data located at
/// "." (the model's folder itself: tract requires an existing path inside it, and "." holds
/// for symlinked model files too) at an offset from [`MOVED_BASE`] that indexes this store;
/// tract's reads of such offsets take the bytes from here, once, without a copy. Real external
/// data goes to tract's own reader. Only on 64-bit targets (the offsets).
struct MovedWeights {
    data: std::sync::Mutex<Vec<Option<Vec<u8>>>>,
}

impl MovedWeights {
    fn take(proto: &mut tract_onnx::pb::ModelProto, path: &Path) -> Option<MovedWeights> {
        use tract_onnx::pb::StringStringEntryProto as Entry;
        if usize::BITS < 64 {
            return None;
        }
        // tract resolves external data only with a model folder it can name
        path.parent()?.to_str()?;
        let graph = proto.graph.as_mut()?;
        let mut data = Vec::new();
        for t in graph.initializer.iter_mut() {
            // large tensors stored inline (the few our parsers read themselves are small scales
            // and zero points, or were taken by [`w8::fuse_weight_dequant`] already)
            if t.raw_data.len() < MOVE_BYTES || t.data_location == Some(1) || !t.external_data.is_empty() {
                continue;
            }
            let bytes = std::mem::take(&mut t.raw_data);
            let entry = |key: &str, value: String| Entry { key: key.into(), value };
            t.external_data = vec![
                entry("location", ".".to_string()),
                entry("offset", (MOVED_BASE + data.len() as u64).to_string()),
                entry("length", bytes.len().to_string()),
            ];
            t.data_location = Some(1);
            data.push(Some(bytes));
        }
        (!data.is_empty()).then(|| MovedWeights { data: std::sync::Mutex::new(data) })
    }
}

impl tract_onnx::data_resolver::ModelDataResolver for MovedWeights {
    fn read_bytes_from_path(&self, buf: &mut Vec<u8>, p: &Path, offset: usize, length: Option<usize>) -> TractResult<()> {
        if (offset as u64) < MOVED_BASE {
            return tract_onnx::data_resolver::MmapDataResolver.read_bytes_from_path(buf, p, offset, length);
        }
        let ix = (offset as u64 - MOVED_BASE) as usize;
        let bytes = self
            .data
            .lock()
            .map_err(|_| anyhow::anyhow!("weight store poisoned"))?
            .get_mut(ix)
            .and_then(Option::take)
            .ok_or_else(|| anyhow::anyhow!("internal: moved weight {ix} read twice or never stored"))?;
        if length.is_some_and(|l| l != bytes.len()) {
            anyhow::bail!("internal: moved weight {ix} has {} bytes, {length:?} asked", bytes.len());
        }
        if buf.is_empty() {
            *buf = bytes;
        } else {
            buf.extend_from_slice(&bytes);
        }
        Ok(())
    }
}

/// While a graph loads, every allocation of 1 MB or more gets its own mapping, given back to
/// the system when freed: glibc otherwise raises its mapping threshold as large blocks are
/// freed, and loading frees many (the protobuf's copies, every weight tract replaces by its
/// packed form), which then stay resident beside their successors. Measured on the B/32 image
/// graph (357 MB): peak RSS 1.16x the graph instead of 2.1x, for about 0.4 s more page faults.
/// When the last concurrent load ends, the threshold goes to 32 MB, so inference reuses heap
/// memory from run to run, and the heap's free pages are handed back.
struct LoadMemory;

static LOADS: std::sync::Mutex<usize> = std::sync::Mutex::new(0);

impl LoadMemory {
    fn begin() -> LoadMemory {
        let mut n = LOADS.lock().unwrap_or_else(|e| e.into_inner());
        // a threshold the user chose for glibc stays theirs
        if *n == 0 && std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            set_mmap_threshold(1 << 20);
        }
        *n += 1;
        LoadMemory
    }
}

impl Drop for LoadMemory {
    fn drop(&mut self) {
        let mut n = LOADS.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 && std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // glibc's own ceiling: 32 MB on 64-bit targets, 16 MB on 32-bit ones
            set_mmap_threshold((4 << 20) * std::mem::size_of::<usize>() as i32);
            release_freed_memory();
        }
    }
}

#[allow(unused_variables)]
fn set_mmap_threshold(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a glibc tuning parameter
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
}

/// Hand the heap's free pages back to the system.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident and peak resident memory of this process in bytes (Linux), for load diagnostics.
pub fn rss_bytes() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The most inference threads accepted (CLI `--threads`, C `options.threads`): far above any
/// board's cores, far below what exhausts a process's threads or panics the pool's builder.
pub const MAX_THREADS: usize = 1024;

/// How graphs are loaded and run.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Threads for tract's matmul executor; 0 = all available cores.
    pub threads: usize,
    /// Precision to load: "f32", "f16" or "int8"; a graph the bundle has only in f32 stays f32
    /// (see [`Bundle::graph_precision`]).
    pub precision: String,
    /// Load f16 graphs even where tract has no fp16 kernel for this CPU (see
    /// [`check_precision`]).
    pub force_precision: bool,
    /// `precision` is a default (a board profile's), not a demand: where the bundle has no
    /// graphs of that precision, or the CPU declines it, load f32 and say so once per graph.
    pub precision_is_default: bool,
    /// tract's own translation of every op, none of ours (for comparisons and diagnosis).
    /// The default comes from the environment: `COCA_TRACT_OPS=1`.
    pub tract_ops: bool,
    /// tract's own int8 kernels for statically quantised products even where ours execute fewer
    /// instructions (for comparisons: the ARM measure counts both from one binary). The default
    /// comes from the environment: `COCA_TRACT_INT8=1`.
    pub tract_int8: bool,
}

/// `name` set to anything but empty or "0": the one place the switches are read.
fn switch_from_env(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: 0,
            precision: "f32".into(),
            force_precision: false,
            precision_is_default: false,
            tract_ops: switch_from_env("COCA_TRACT_OPS"),
            tract_int8: switch_from_env("COCA_TRACT_INT8"),
        }
    }
}

impl EngineOptions {
    /// The thread count actually used (resolves 0 to the number of available cores).
    pub fn effective_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        }
    }

    fn run_options(&self) -> RunOptions {
        let n = self.effective_threads();
        let executor = if n > 1 {
            Some(tract_linalg::multithread::Executor::multithread_with_name(n, "coca-mm"))
        } else {
            Some(tract_linalg::multithread::Executor::SingleThread)
        };
        RunOptions { executor, ..Default::default() }
    }
}

/// One loaded, optimised graph with a fixed batch.
pub struct Graph {
    name: String,
    path: PathBuf,
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    load_time: std::time::Duration,
    precision: String,
    rewritten: bool,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").field("name", &self.name).field("path", &self.path).finish()
    }
}

fn datum_type(dtype: &str, path: &Path) -> Result<DatumType> {
    Ok(match dtype {
        "f32" => f32::datum_type(),
        "f16" => f16::datum_type(),
        "i64" => i64::datum_type(),
        "i32" => i32::datum_type(),
        "u8" => u8::datum_type(),
        "i8" => i8::datum_type(),
        other => return Err(Error::GraphMismatch { path: path.to_path_buf(), message: format!("unknown dtype '{other}' in manifest") }),
    })
}

/// Concrete shape of a manifest tensor with every symbolic dim set to `batch`.
fn concrete_shape(spec: &TensorSpec, batch: usize) -> Vec<usize> {
    spec.shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbol(_) => batch,
        })
        .collect()
}

/// How a graph's symbolic dims are fixed at load time: `Some(n)` fixes a symbol (e.g. "batch")
/// to `n`, `None` keeps it symbolic (tract then plans for any size).
pub type Binding<'a> = &'a dyn Fn(&str) -> Option<usize>;

impl Graph {
    /// Load graph `name` of `bundle` at `opts.precision`, with symbols fixed by `bind`.
    pub fn load(bundle: &Bundle, name: &str, bind: Binding, opts: &EngineOptions) -> Result<Graph> {
        Graph::load_with(bundle, name, bind, opts, None)
    }

    /// [`Graph::load`], with `graph_rewrite` made where it applies ([`Graph::rewritten`]).
    pub(crate) fn load_with(bundle: &Bundle, name: &str, bind: Binding, opts: &EngineOptions, graph_rewrite: Option<&GraphRewrite>) -> Result<Graph> {
        let t0 = Instant::now();
        let _memory = LoadMemory::begin();
        let mut spec: &GraphSpec = bundle.graph(name)?;
        let precision = match check_precision(&opts.precision, opts.force_precision).and_then(|_| bundle.graph_precision(name, &opts.precision)) {
            Err(e) if opts.precision_is_default && opts.precision != "f32" => {
                log::info!("{name}: the board's default precision {} is not available here ({e}); loading f32", opts.precision);
                bundle.graph_precision(name, "f32")?
            }
            r => r?,
        };
        let path = bundle.graph_file(name, &precision)?;
        let mismatch = |message: String| Error::GraphMismatch { path: path.clone(), message };
        let engine = |e: TractError| Error::Engine { what: path.display().to_string(), message: crate::error::one_line(&format!("{e:#}")) };

        // our f32 products and attention in every graph where the kernels make them pay
        // (f32mm, attn; AVX-512 CPUs today): the image encoder's many-row products are where
        // tract's kernels fall behind, and the decoder step's too (B/32, 2 threads: 6-beam step
        // 47 -> 37 ms, 1-beam 28 -> 26 ms)
        let rewrites = Rewrites::of(opts);
        let (mut model, rewritten) = load_onnx_rewritten(&path, rewrites, graph_rewrite).map_err(|e| Error::Engine {
            what: path.display().to_string(),
            message: format!("not a loadable ONNX graph: {}", crate::error::one_line(&format!("{e:#}"))),
        })?;
        if let Some(s) = graph_rewrite.filter(|_| rewritten).and_then(|g| g.spec.as_ref()) {
            spec = s;
        }

        // names and counts of inputs and outputs
        let in_names: Vec<String> = model.input_outlets().map_err(engine)?.iter().map(|o| model.node(o.node).name.clone()).collect();
        let want_in: Vec<String> = spec.inputs.iter().map(|t| t.name.clone()).collect();
        if in_names != want_in {
            return Err(mismatch(format!("inputs are {in_names:?}, manifest says {want_in:?}")));
        }
        let out_names: Vec<String> = model
            .output_outlets()
            .map_err(engine)?
            .iter()
            .map(|o| model.outlet_label(*o).map(|s| s.to_string()).unwrap_or_else(|| model.node(o.node).name.clone()))
            .collect();
        let want_out: Vec<String> = spec.outputs.iter().map(|t| t.name.clone()).collect();
        if out_names != want_out {
            return Err(mismatch(format!("outputs are {out_names:?}, manifest says {want_out:?}")));
        }

        // the dims the manifest promises, with bound symbols resolved
        let expected = |t: &TensorSpec| -> Vec<Option<usize>> {
            t.shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => Some(*n),
                    Dim::Symbol(s) => bind(s),
                })
                .collect()
        };
        // input facts: the declared dtype and rank must agree with the graph's own declaration
        for (ix, t) in spec.inputs.iter().enumerate() {
            let dt = datum_type(&t.dtype, &path)?;
            let declared = model.input_fact(ix).map_err(engine)?.clone();
            if let Some(gdt) = declared.datum_type.concretize() {
                if gdt != dt {
                    return Err(mismatch(format!("input '{}' is {gdt:?} in the graph, manifest says {}", t.name, t.dtype)));
                }
            }
            if let Some(rank) = declared.shape.rank().concretize() {
                if rank as usize != t.shape.len() {
                    return Err(mismatch(format!(
                        "input '{}' has rank {rank} in the graph, manifest says {} ({})",
                        t.name,
                        t.shape.len(),
                        t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
                    )));
                }
            }
            for (axis, d) in t.shape.iter().enumerate() {
                if let (Dim::Fixed(n), Some(g)) = (d, declared.shape.dim(axis).and_then(|f| f.concretize())) {
                    if let Ok(g) = g.to_i64() {
                        if g as usize != *n {
                            return Err(mismatch(format!("input '{}' axis {axis} is {g} in the graph, manifest says {n}", t.name)));
                        }
                    }
                }
            }
            let mut shape: Vec<TDim> = Vec::with_capacity(t.shape.len());
            for (d, e) in t.shape.iter().zip(expected(t)) {
                shape.push(match (d, e) {
                    (_, Some(n)) => n.to_dim(),
                    (Dim::Symbol(s), None) => model.symbols.parse_tdim(s).map_err(|e| mismatch(format!("input '{}': bad symbolic dim '{s}': {e}", t.name)))?,
                    (Dim::Fixed(n), None) => n.to_dim(),
                });
            }
            model.set_input_fact(ix, InferenceFact::dt_shape(dt, shape)).map_err(engine)?;
        }

        let mem = |stage: &str| {
            if log::log_enabled!(log::Level::Debug) {
                if let Some((rss, peak)) = rss_bytes() {
                    log::debug!("{name}: {stage} at {:.2?}: RSS {} MB, peak {} MB", t0.elapsed(), rss >> 20, peak >> 20);
                }
            }
        };
        mem("parsed");
        let typed = model.into_typed().map_err(|e| mismatch(format!("cannot analyse: {}", crate::error::one_line(&format!("{e:#}")))))?;
        mem("typed");
        // outputs: ranks and fixed sizes must agree with the manifest
        for (ix, t) in spec.outputs.iter().enumerate() {
            let fact = typed.output_fact(ix).map_err(engine)?;
            let want = expected(t);
            let got: Vec<Option<usize>> = fact.shape.iter().map(|d| d.to_i64().ok().map(|v| v as usize)).collect();
            let ok =
                got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| matches!((g, w), (Some(g), Some(w)) if g == w) || w.is_none() || g.is_none());
            if !ok {
                return Err(mismatch(format!("output '{}' has shape {:?}, manifest says {:?}", t.name, fact.shape, t.shape)));
            }
            let dt = datum_type(&t.dtype, &path)?;
            if fact.datum_type != dt {
                return Err(mismatch(format!("output '{}' is {:?}, manifest says {}", t.name, fact.datum_type, t.dtype)));
            }
        }
        let optimized = optimize(typed, rewrites.ours).map_err(engine)?;
        mem("optimised");
        let plan = optimized.into_runnable_with_options(&opts.run_options()).map_err(engine)?;
        mem("planned");
        let load_time = t0.elapsed();
        log::debug!("{name}: loaded {} in {:.2?}", path.display(), load_time);
        Ok(Graph { name: name.to_string(), path, plan, inputs: spec.inputs.clone(), outputs: spec.outputs.clone(), load_time, precision, rewritten })
    }

    /// The graph-specific rewrite given to [`Graph::load_with`] was made.
    pub(crate) fn rewritten(&self) -> bool {
        self.rewritten
    }

    /// A run state of its own (for graphs whose ops keep state from run to run).
    fn spawn(&self) -> Result<TypedSimpleState> {
        self.plan.spawn().map_err(|e| Error::engine(format!("starting {}", self.name), e))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// The precision of the file that was loaded (f32 where the bundle has no other).
    pub fn precision(&self) -> &str {
        &self.precision
    }
    pub fn load_time(&self) -> std::time::Duration {
        self.load_time
    }

    /// Time each operator over `runs` runs of `inputs`: (operator kind, total ms, count),
    /// most expensive first. For finding where the time goes (`coca bench --profile`).
    pub(crate) fn profile(&self, inputs: TVec<TValue>, runs: usize) -> Result<Vec<(String, f64, usize)>> {
        use std::collections::HashMap;
        let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
        for _ in 0..runs {
            let mut state = self.plan.spawn().map_err(|e| Error::engine(format!("profiling {}", self.name), e))?;
            state
                .run_plan_with_eval(inputs.clone(), |ctx, st, node, input| {
                    let t = Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, st, node, input);
                    let e = by_op.entry(node.op().name().to_string()).or_default();
                    e.0 += t.elapsed().as_secs_f64() * 1e3;
                    e.1 += 1;
                    r
                })
                .map_err(|e| Error::engine(format!("profiling {}", self.name), e))?;
        }
        let mut v: Vec<(String, f64, usize)> = by_op.into_iter().map(|(k, (ms, n))| (k, ms / runs as f64, n / runs)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    fn run(&self, inputs: TVec<TValue>) -> Result<TVec<TValue>> {
        self.plan.run(inputs).map_err(|e| Error::engine(format!("running {}", self.name), e))
    }
}

fn f32_output<'a>(v: &'a TValue, what: &str) -> Result<&'a [f32]> {
    v.try_as_plain_ram().and_then(|p| p.as_slice::<f32>()).map_err(|e| Error::engine(what, e))
}

/// Output of the image encoder for one image.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// L2-normalised contrastive embedding, `embed_dim` values.
    pub embedding: Vec<f32>,
    /// Captioning tokens, `caption_tokens x token_dim` values, row-major.
    pub tokens: Vec<f32>,
    /// The ViT's tokens before the attentional pooler (`dims.frozen_tokens`), when the bundle
    /// was exported with them; empty otherwise.
    pub frozen_tokens: Vec<f32>,
}

/// `image_encoder`: preprocessed image -> embedding + captioning tokens (batch 1).
#[derive(Debug)]
pub struct ImageEncoder {
    graph: Graph,
    size: usize,
    embed_dim: usize,
    n_tokens: usize,
    token_dim: usize,
}

impl ImageEncoder {
    pub fn load(bundle: &Bundle, opts: &EngineOptions) -> Result<ImageEncoder> {
        let m = bundle.manifest();
        let graph = Graph::load(bundle, "image_encoder", &|s| (s == "batch").then_some(1), opts)?;
        let expect = |ix: usize, want: Vec<usize>| -> Result<()> {
            let got = concrete_shape(&graph.outputs[ix], 1);
            if got != want {
                return Err(Error::GraphMismatch {
                    path: graph.path.clone(),
                    message: format!("output '{}' is {:?}, dims in the manifest say {:?}", graph.outputs[ix].name, got, want),
                });
            }
            Ok(())
        };
        let n_out = if m.dims.frozen_tokens.is_some() { 3 } else { 2 };
        if graph.inputs.len() != 1 || graph.outputs.len() != n_out {
            return Err(Error::GraphMismatch {
                path: graph.path.clone(),
                message: format!("image_encoder needs 1 input and {n_out} outputs, has {} and {}", graph.inputs.len(), graph.outputs.len()),
            });
        }
        let size = m.image.size as usize;
        if concrete_shape(&graph.inputs[0], 1) != vec![1, 3, size, size] {
            return Err(Error::GraphMismatch { path: graph.path.clone(), message: format!("input is not [batch,3,{size},{size}]") });
        }
        expect(0, vec![1, m.dims.embed_dim])?;
        expect(1, vec![1, m.dims.caption_tokens, m.dims.token_dim])?;
        if let Some([t, w]) = m.dims.frozen_tokens {
            expect(2, vec![1, t, w])?;
        }
        Ok(ImageEncoder { graph, size, embed_dim: m.dims.embed_dim, n_tokens: m.dims.caption_tokens, token_dim: m.dims.token_dim })
    }

    /// Run on one preprocessed image, CHW f32 of `3 x size x size`.
    pub fn run(&self, chw: &[f32]) -> Result<ImageFeatures> {
        let s = self.size;
        if chw.len() != 3 * s * s {
            return Err(Error::InvalidArgument(format!("image tensor has {} values, expected 3x{s}x{s}", chw.len())));
        }
        let input = Tensor::from_shape(&[1, 3, s, s], chw).map_err(|e| Error::engine("image tensor", e))?;
        let out = self.graph.run(tvec!(input.into_tvalue()))?;
        let embedding = f32_output(&out[0], "image_encoder output")?.to_vec();
        let tokens = f32_output(&out[1], "image_encoder output")?.to_vec();
        let frozen_tokens = match out.get(2) {
            Some(t) => f32_output(t, "image_encoder output")?.to_vec(),
            None => Vec::new(),
        };
        debug_assert_eq!(embedding.len(), self.embed_dim);
        debug_assert_eq!(tokens.len(), self.n_tokens * self.token_dim);
        Ok(ImageFeatures { embedding, tokens, frozen_tokens })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Per-operator time of one preprocessed image (see [`Graph::profile`]).
    pub fn profile(&self, chw: &[f32], runs: usize) -> Result<Vec<(String, f64, usize)>> {
        let s = self.size;
        let input = Tensor::from_shape(&[1, 3, s, s], chw).map_err(|e| Error::engine("image tensor", e))?;
        self.graph.profile(tvec!(input.into_tvalue()), runs)
    }
}

/// `text_encoder`: token ids `[n, context]` -> L2-normalised embeddings `[n, embed_dim]`.
/// Runs in chunks of a fixed batch; the last chunk is padded with empty texts.
#[derive(Debug)]
pub struct TextEncoder {
    graph: Graph,
    context: usize,
    embed_dim: usize,
}

/// Batch the text encoder is fixed to: label sets are encoded in chunks of this size.
pub const TEXT_BATCH: usize = 8;

impl TextEncoder {
    pub fn load(bundle: &Bundle, opts: &EngineOptions) -> Result<TextEncoder> {
        let m = bundle.manifest();
        let graph = Graph::load(bundle, "text_encoder", &|s| (s == "batch").then_some(TEXT_BATCH), opts)?;
        if graph.inputs.len() != 1 || graph.outputs.len() != 1 {
            return Err(Error::GraphMismatch { path: graph.path.clone(), message: "text_encoder needs 1 input and 1 output".into() });
        }
        let ctx = m.text.context_length;
        if concrete_shape(&graph.inputs[0], 1) != vec![1, ctx] {
            return Err(Error::GraphMismatch { path: graph.path.clone(), message: format!("input is not [batch,{ctx}] (text.context_length)") });
        }
        if concrete_shape(&graph.outputs[0], 1) != vec![1, m.dims.embed_dim] {
            return Err(Error::GraphMismatch { path: graph.path.clone(), message: format!("output is not [batch,{}]", m.dims.embed_dim) });
        }
        Ok(TextEncoder { graph, context: ctx, embed_dim: m.dims.embed_dim })
    }

    pub fn context_length(&self) -> usize {
        self.context
    }

    /// Encode `ids.len() / context` texts; returns `n * embed_dim` values.
    pub fn run(&self, ids: &[i64], mut progress: impl FnMut(usize, usize)) -> Result<Vec<f32>> {
        let ctx = self.context;
        if !ids.len().is_multiple_of(ctx) {
            return Err(Error::InvalidArgument(format!("{} token ids is not a multiple of the context length {ctx}", ids.len())));
        }
        let n = ids.len() / ctx;
        let b = TEXT_BATCH;
        let mut out = Vec::with_capacity(n * self.embed_dim);
        let mut chunk = vec![0i64; b * ctx];
        for start in (0..n).step_by(b) {
            let m = (n - start).min(b);
            chunk.iter_mut().for_each(|v| *v = 0);
            chunk[..m * ctx].copy_from_slice(&ids[start * ctx..(start + m) * ctx]);
            let t = Tensor::from_shape(&[b, ctx], &chunk).map_err(|e| Error::engine("text tensor", e))?;
            let res = self.graph.run(tvec!(t.into_tvalue()))?;
            let e = f32_output(&res[0], "text_encoder output")?;
            out.extend_from_slice(&e[..m * self.embed_dim]);
            progress(start + m, n);
        }
        Ok(out)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }
}

/// Cross-attention keys/values of one image, `[layers, 2, 1, heads, tokens, head_dim]`, shared
/// by every decoding step and every beam (an `Arc`, never copied).
#[derive(Debug, Clone)]
pub struct CrossKv(TValue);

/// The self-attention KV cache of one decoding run (a clone copies it).
#[derive(Clone)]
pub struct KvCache {
    store: Store,
    batch: usize,
    past: usize,
}

#[derive(Clone)]
enum Store {
    /// The graph as exported: `[layers, 2, batch, heads, past, head_dim]`, an input of each step
    /// and its grown copy an output.
    Copied(TValue),
    /// The rewritten graph ([`kv`]): the keys and values live in the op states of this run state
    /// (made at the first step); `rows` (batch x past) says which cache row holds each sequence's
    /// each position.
    InPlace { state: Option<Box<TypedSimpleState>>, rows: Vec<i64> },
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if matches!(self.store, Store::Copied(_)) { "copied" } else { "in place" };
        f.debug_struct("KvCache").field("kind", &kind).field("batch", &self.batch).field("past", &self.past).finish()
    }
}

impl KvCache {
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Tokens already in the cache.
    pub fn past(&self) -> usize {
        self.past
    }
}

/// The captioning graphs: `cross_kv` (once per image) and `decoder_step` (KV-cached step with
/// symbolic batch, step and past lengths; with our ops, rewritten to keep its caches in place:
/// [`kv`]).
#[derive(Debug)]
pub struct Decoder {
    cross: Graph,
    step: Graph,
    dims: crate::bundle::DecoderDims,
    n_tokens: usize,
    token_dim: usize,
}

/// The decoder step's interface once [`kv::cache_in_place`] has rewritten it: `self_kv` becomes
/// `kv_rows` (int64, the key mask's shape) and `self_kv_out` goes. `None` when the manifest does
/// not describe the exported step.
fn in_place_spec(spec: &GraphSpec) -> Option<GraphSpec> {
    let names: Vec<&str> = spec.inputs.iter().map(|t| t.name.as_str()).collect();
    let outs: Vec<&str> = spec.outputs.iter().map(|t| t.name.as_str()).collect();
    if names != ["ids", "key_mask", "self_kv", "cross_kv"] || outs != ["logits", "self_kv_out"] {
        return None;
    }
    let mut s = spec.clone();
    s.inputs[2] = TensorSpec { name: kv::ROWS.into(), dtype: "i64".into(), shape: spec.inputs[1].shape.clone() };
    s.outputs.truncate(1);
    Some(s)
}

impl Decoder {
    pub fn load(bundle: &Bundle, opts: &EngineOptions) -> Result<Decoder> {
        let m = bundle.manifest();
        let missing = |what: &str| Error::Manifest {
            path: bundle.dir().join(crate::bundle::MANIFEST),
            message: format!("bundle has no {what}: it cannot caption (re-export it with models/export/export.py)"),
        };
        let dims = m.decoder.clone().ok_or_else(|| missing("'decoder' section"))?;
        for g in ["cross_kv", "decoder_step"] {
            if !m.graphs.contains_key(g) {
                return Err(missing(&format!("'{g}' graph")));
            }
        }
        let cross = Graph::load(bundle, "cross_kv", &|_| None, opts)?;
        // the rows of the token and positional embeddings, as the graph holds them (export.py's
        // names): the manifest's vocabulary and positions must fit them (tract's Gather panics
        // on an index past its table)
        let tables: std::cell::Cell<(Option<i64>, Option<i64>)> = Default::default();
        let apply = |proto: &mut tract_onnx::pb::ModelProto, rewrite: bool| {
            let rows = |name: &str| proto.graph.as_ref()?.initializer.iter().find(|t| t.name == name).and_then(|t| t.dims.first().copied());
            tables.set((rows("text.token_embedding.weight"), rows("text.positional_embedding")));
            if !rewrite {
                return false;
            }
            match kv::cache_in_place(proto) {
                Some(r) => {
                    log::debug!("decoder_step: {} self-attention caches in place, {} cross-attentions read in place", r.self_attention, r.cross_attention);
                    true
                }
                None => {
                    log::debug!("decoder_step: not the exported shape, its caches are copied at each step");
                    false
                }
            }
        };
        let rewrite = GraphRewrite { apply: &apply, spec: in_place_spec(bundle.graph("decoder_step")?) };
        let step = Graph::load_with(bundle, "decoder_step", &|_| None, opts, Some(&rewrite))?;
        let (vocab_rows, position_rows) = tables.get();
        let mismatch = |message: String| Error::Manifest { path: bundle.dir().join(crate::bundle::MANIFEST), message };
        if let Some(v) = vocab_rows.filter(|&v| v as u64 != dims.vocab_size as u64) {
            return Err(mismatch(format!("decoder.vocab_size is {} but the decoder_step graph embeds {v} tokens", dims.vocab_size)));
        }
        if let Some(p) = position_rows.filter(|&p| (p as u64) < dims.max_positions as u64) {
            return Err(mismatch(format!("decoder.max_positions is {} but the decoder_step graph has {p} positions", dims.max_positions)));
        }
        Ok(Decoder { cross, step, dims, n_tokens: m.dims.caption_tokens, token_dim: m.dims.token_dim })
    }

    pub fn dims(&self) -> &crate::bundle::DecoderDims {
        &self.dims
    }

    /// The caches stay in place between steps (else each step copies them).
    pub fn cache_in_place(&self) -> bool {
        self.step.rewritten()
    }

    /// Bytes of KV cache one beam needs per token (self-attention layers, keys and values).
    pub fn cache_bytes_per_token(&self) -> usize {
        self.dims.self_layers * 2 * self.dims.heads * self.dims.head_dim * 4
    }

    /// Cross-attention keys/values from an image's captioning tokens (`tokens x token_dim`).
    pub fn cross_kv(&self, tokens: &[f32]) -> Result<CrossKv> {
        if tokens.len() != self.n_tokens * self.token_dim {
            return Err(Error::InvalidArgument(format!("{} captioning token values, expected {}x{}", tokens.len(), self.n_tokens, self.token_dim)));
        }
        let t = Tensor::from_shape(&[1, self.n_tokens, self.token_dim], tokens).map_err(|e| Error::engine("tokens tensor", e))?;
        let mut out = self.cross.run(tvec!(t.into_tvalue()))?;
        Ok(CrossKv(out.remove(0)))
    }

    /// An empty cache for `batch` sequences.
    pub fn empty_cache(&self, batch: usize) -> KvCache {
        let store = if self.cache_in_place() {
            Store::InPlace { state: None, rows: Vec::new() }
        } else {
            let d = &self.dims;
            Store::Copied(Tensor::zero::<f32>(&[d.self_layers, 2, batch, d.heads, 0, d.head_dim]).expect("empty tensor").into_tvalue())
        };
        KvCache { store, batch, past: 0 }
    }

    /// Feed `step` new tokens per sequence (`ids`: batch x step, row-major) with the additive key
    /// mask over all `past + step` positions (batch rows). Returns the logits of each sequence's
    /// last new position (batch x vocab) and grows the cache.
    pub fn step(&self, cache: &mut KvCache, ids: &[i64], step: usize, key_mask: &[f32], cross: &CrossKv) -> Result<Vec<f32>> {
        let b = cache.batch;
        let total = cache.past + step;
        if step == 0 || ids.len() != b * step || key_mask.len() != b * total {
            return Err(Error::InvalidArgument(format!(
                "decoder step: {} ids and {} mask values for batch {b}, step {step}, past {}",
                ids.len(),
                key_mask.len(),
                cache.past
            )));
        }
        if total > self.dims.max_positions {
            return Err(Error::InvalidArgument(format!("sequence of {total} tokens is over the decoder's {} positions", self.dims.max_positions)));
        }
        // (tract's Gather panics on an index past the embedding table)
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as u64 >= self.dims.vocab_size as u64) {
            return Err(Error::InvalidArgument(format!("decoder step: token id {bad} is outside the decoder's vocabulary of {}", self.dims.vocab_size)));
        }
        let ids = Tensor::from_shape(&[b, step], ids).map_err(|e| Error::engine("ids tensor", e))?.into_tvalue();
        let mask = Tensor::from_shape(&[b, total], key_mask).map_err(|e| Error::engine("mask tensor", e))?.into_tvalue();
        let past = cache.past;
        let logits = match &mut cache.store {
            Store::Copied(kv) => {
                let mut out = self.step.run(tvec!(ids, mask, kv.clone(), cross.0.clone()))?;
                *kv = out.remove(1);
                f32_output(&out[0], "decoder_step logits")?.to_vec()
            }
            Store::InPlace { state, rows } => {
                // each sequence's past where the table says, its new positions in its own row
                let mut table = Vec::with_capacity(b * total);
                for i in 0..b {
                    table.extend_from_slice(&rows[i * past..(i + 1) * past]);
                    table.extend(std::iter::repeat_n(i as i64, step));
                }
                let t = Tensor::from_shape(&[b, total], &table).map_err(|e| Error::engine("kv rows tensor", e))?.into_tvalue();
                if state.is_none() {
                    *state = Some(Box::new(self.step.spawn()?));
                }
                let st = state.as_mut().expect("made above");
                let out = st.run(tvec!(ids, mask, t, cross.0.clone())).map_err(|e| Error::engine("running decoder_step", e))?;
                *rows = table;
                f32_output(&out[0], "decoder_step logits")?.to_vec()
            }
        };
        cache.past = total;
        Ok(logits)
    }

    /// Repeat a batch-1 cache `batch` times (beams that share their prompt run it once).
    pub fn tile(&self, cache: &mut KvCache, batch: usize) -> Result<()> {
        if cache.batch != 1 {
            return Err(Error::InvalidArgument(format!("tile needs a batch-1 cache, got batch {}", cache.batch)));
        }
        let d = &self.dims;
        let past = cache.past;
        match &mut cache.store {
            Store::Copied(kv) => {
                let old = f32_output(kv, "kv cache")?;
                let block = d.heads * past * d.head_dim;
                let mut new = Vec::with_capacity(old.len() * batch);
                for lc in old.chunks(block.max(1)).take(d.self_layers * 2) {
                    for _ in 0..batch {
                        new.extend_from_slice(lc);
                    }
                }
                let t = Tensor::from_shape(&[d.self_layers, 2, batch, d.heads, past, d.head_dim], &new).map_err(|e| Error::engine("kv cache", e))?;
                *kv = t.into_tvalue();
            }
            // every sequence reads row 0's past
            Store::InPlace { rows, .. } => *rows = rows.repeat(batch),
        }
        cache.batch = batch;
        Ok(())
    }

    /// Reorder the cache's sequences: new sequence `i` is old sequence `order[i]` (beam search).
    /// In place, only the row table changes.
    pub fn reorder(&self, cache: &mut KvCache, order: &[usize]) -> Result<()> {
        let b = cache.batch;
        if order.len() != b || order.iter().any(|&o| o >= b) {
            return Err(Error::InvalidArgument(format!("beam order {order:?} for batch {b}")));
        }
        if order.iter().enumerate().all(|(i, &o)| i == o) || cache.past == 0 {
            return Ok(());
        }
        let d = &self.dims;
        let past = cache.past;
        match &mut cache.store {
            Store::Copied(kv) => {
                let old = f32_output(kv, "kv cache")?;
                let block = d.heads * past * d.head_dim;
                let mut new = vec![0f32; old.len()];
                for lc in 0..d.self_layers * 2 {
                    for (i, &o) in order.iter().enumerate() {
                        let dst = (lc * b + i) * block;
                        let src = (lc * b + o) * block;
                        new[dst..dst + block].copy_from_slice(&old[src..src + block]);
                    }
                }
                let t = Tensor::from_shape(&[d.self_layers, 2, b, d.heads, past, d.head_dim], &new).map_err(|e| Error::engine("kv cache", e))?;
                *kv = t.into_tvalue();
            }
            Store::InPlace { rows, .. } => {
                let old = std::mem::take(rows);
                for &o in order {
                    rows.extend_from_slice(&old[o * past..(o + 1) * past]);
                }
            }
        }
        Ok(())
    }

    /// Per-operator time of one decoder step of `batch` sequences with `past` cached tokens
    /// (zero cache and image features; the time does not depend on the values). For
    /// `coca bench --caption --profile`.
    pub fn profile_step(&self, batch: usize, past: usize, runs: usize) -> Result<Vec<(String, f64, usize)>> {
        let d = &self.dims;
        let cross = self.cross_kv(&vec![0f32; self.n_tokens * self.token_dim])?;
        let ids = Tensor::from_shape(&[batch, 1], &vec![0i64; batch]).map_err(|e| Error::engine("ids tensor", e))?;
        let mask = Tensor::zero::<f32>(&[batch, past + 1]).map_err(|e| Error::engine("mask tensor", e))?;
        let kv = if self.cache_in_place() {
            // (a fresh state per run: its caches start empty and hold zeros, which is all a
            // profile needs)
            let rows: Vec<i64> = (0..batch).flat_map(|i| std::iter::repeat_n(i as i64, past + 1)).collect();
            Tensor::from_shape(&[batch, past + 1], &rows).map_err(|e| Error::engine("kv rows tensor", e))?
        } else {
            Tensor::zero::<f32>(&[d.self_layers, 2, batch, d.heads, past, d.head_dim]).map_err(|e| Error::engine("kv cache", e))?
        };
        self.step.profile(tvec!(ids.into_tvalue(), mask.into_tvalue(), kv.into_tvalue(), cross.0.clone()), runs)
    }

    pub fn step_graph(&self) -> &Graph {
        &self.step
    }
}

/// CPU features tract's kernels can use, for `coca info`.
pub fn cpu_features() -> Vec<&'static str> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            v.push("avx2");
        }
        if std::is_x86_feature_detected!("fma") {
            v.push("fma");
        }
        if std::is_x86_feature_detected!("avx512f") {
            v.push("avx512f");
        }
        if std::is_x86_feature_detected!("f16c") {
            v.push("f16c");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push("neon");
        }
        if std::arch::is_aarch64_feature_detected!("fp16") {
            v.push("fp16");
        }
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push("dotprod");
        }
        if std::arch::is_aarch64_feature_detected!("sve") {
            v.push("sve");
        }
    }
    v
}

/// Refuse f16 where tract's kernel selection has only its portable `generic_*` kernel for f16
/// matrix products (every x86 CPU, aarch64 without fp16 arithmetic such as the Pi 4's
/// Cortex-A72): it is correct there but hundreds of times slower than f32. `force` overrides.
pub fn check_precision(precision: &str, force: bool) -> Result<()> {
    match precision {
        "f32" | "int8" => Ok(()),
        "f16" => {
            let k = kernel_report(768, 768, 50);
            let fast = k.matmul_f16.as_deref().is_some_and(|n| !n.starts_with("generic"));
            if fast || force {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "precision f16 declined: this CPU ({}) has no fp16 arithmetic tract can use (its f16 kernel would be {}, \
                     hundreds of times slower than f32); use --precision f32 or int8, or --force-precision",
                    k.level,
                    k.matmul_f16.as_deref().unwrap_or("none")
                )))
            }
        }
        other => Err(Error::InvalidArgument(format!("unknown precision '{other}' (expected f32, f16 or int8)"))),
    }
}

/// What tract's kernel selection sees on this machine: its ISA set (after any `TRACT_CPU_ISA`
/// override), the rung's nickname, and the matrix-multiply kernel it prefers for an f32 and an
/// f16 product of a transformer-like shape (`m x k` weights times `k x n` activations). On
/// aarch64 a NEON kernel is named `arm64simd_*`, an fp16 one `arm64fp16_*`; `generic_*` is the
/// portable fallback.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelReport {
    pub isa: String,
    pub level: String,
    pub matmul_f32: Option<String>,
    pub matmul_f16: Option<String>,
}

pub fn kernel_report(m: usize, k: usize, n: usize) -> KernelReport {
    let isa = tract_linalg::isa::native();
    let dispatch = tract_linalg::MmmDispatch::native();
    let name = |dt: DatumType| dispatch.preferred_kernel(dt, Some(m), Some(k), Some(n)).map(|kern| kern.name().to_string());
    KernelReport { isa: format!("{isa:?}"), level: isa.nickname().to_string(), matmul_f32: name(DatumType::F32), matmul_f16: name(DatumType::F16) }
}

impl EngineOptions {
    /// The one place a board profile becomes engine options: explicit `threads` and
    /// `precision` win, then the board's (its threads capped at the cores online), then the
    /// defaults. `force_precision` and any later fields keep their defaults.
    pub fn for_board(board: Option<&crate::board::BoardProfile>, threads: Option<usize>, precision: Option<&str>) -> EngineOptions {
        let mut o = EngineOptions::default();
        if let Some(t) = threads.or_else(|| board.map(|b| b.threads_here())) {
            o.threads = t;
        }
        if let Some(p) = precision {
            o.precision = p.to_string();
        } else if let Some(b) = board {
            o.precision = b.precision.clone();
            o.precision_is_default = true;
        }
        o
    }
}

#[cfg(test)]
mod load_tests {
    const OURS: super::Rewrites = super::Rewrites { ours: true, f32_products: false, int8_products: false };
    use super::test_proto::{model, node, tensor, value_info};
    use super::*;
    use prost::Message;
    use tract_onnx::pb;

    /// y = x + a + b with `a` inline (1.2 MB: moved out of the protobuf, and the file spans
    /// more than one read window) and `b` in a real external-data file (tract's reader).
    #[test]
    fn large_inline_and_external_weights_load_through_the_window() {
        let n = 300_000;
        let a: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
        let b: Vec<f32> = (0..n).map(|i| -((i % 7) as f32)).collect();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.bin"), b.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let mut b_proto = tensor("b", &[], &[]);
        b_proto.dims = vec![n as i64];
        b_proto.data_location = Some(1);
        b_proto.external_data = vec![
            pb::StringStringEntryProto { key: "location".into(), value: "b.bin".into() },
            pb::StringStringEntryProto { key: "length".into(), value: (4 * n).to_string() },
        ];
        let graph = pb::GraphProto {
            name: "g".into(),
            node: vec![node("Add", &["x", "a"], "xa", vec![]), node("Add", &["xa", "b"], "y", vec![])],
            initializer: vec![tensor("a", &[n as i64], &a), b_proto],
            input: vec![value_info("x", &[n as i64])],
            output: vec![value_info("y", &[n as i64])],
            ..Default::default()
        };
        let model = model(graph);
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, model.encode_to_vec()).unwrap();
        let plan = load_onnx_with(&path, OURS).unwrap().into_optimized().unwrap().into_runnable().unwrap();
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let y = plan.run(tvec!(tract_ndarray::Array1::from(x.clone()).into_tensor().into())).unwrap();
        let y = y[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        for i in [0, 1, 999, 262_143, 262_144, n - 1] {
            assert_eq!(y[i], x[i] + a[i] + b[i], "value {i}");
        }
        // a truncated file is an error, not a panic
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(load_onnx_with(&path, OURS).is_err());
    }
}
