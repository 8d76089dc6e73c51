//! Criterion benches of the image path: decode, preprocess (PIL-exact resize + crop +
//! normalise) and the image encoder (ViT + attentional pooler), batch 1.
//!
//! Bundle: $COCA_BENCH_MODEL (e.g. the coca_ViT-B-32 geometry exported by
//! benches/compare/compare.py) or the shipped test bundle. Threads: $COCA_BENCH_THREADS (1).

use std::path::PathBuf;

use coca_edge::model::EngineOptions;
use coca_edge::vision::{self, DecodeLimits};
use coca_edge::{Pipeline, PipelineOptions};
use criterion::{criterion_group, criterion_main, Criterion};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bench(c: &mut Criterion) {
    let model = std::env::var_os("COCA_BENCH_MODEL").map(PathBuf::from).unwrap_or_else(|| root().join(coca_edge::TEST_BUNDLE));
    let threads: usize = std::env::var("COCA_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let opts = PipelineOptions { engine: EngineOptions { threads, ..Default::default() }, ..Default::default() };
    let p = Pipeline::open(&model, opts).expect("bundle opens");
    let name = p.bundle().manifest().name.clone();
    let photo = root().join("tests/fixtures/images/china.jpg");
    let bytes = std::fs::read(&photo).unwrap();
    let limits = DecodeLimits::default();
    let img = vision::decode_image(&bytes, "china.jpg", &limits).unwrap();
    let chw = p.preprocess(&img);

    let mut g = c.benchmark_group(format!("image_path/{name}/{threads}t"));
    g.sample_size(20);
    g.bench_function("decode_jpeg_427x640", |b| b.iter(|| vision::decode_image(&bytes, "china.jpg", &limits).unwrap()));
    g.bench_function("preprocess", |b| b.iter(|| p.preprocess(&img)));
    g.bench_function("encoder", |b| b.iter(|| p.embed_preprocessed(&chw).unwrap()));
    g.bench_function("decode+preprocess+encoder", |b| {
        b.iter(|| {
            let img = vision::decode_image(&bytes, "china.jpg", &limits).unwrap();
            p.embed_image(&img).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
