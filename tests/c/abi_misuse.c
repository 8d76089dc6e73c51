/* Every coca-edge C function called with null pointers, wrong sizes, invalid enums and invalid
 * UTF-8: each must return its status code (never crash), write no output on failure, and leave
 * nothing leaked (tests/c_abi.rs runs this under valgrind).
 *
 *   coca_abi_misuse_c BUNDLE        exit 0 when every check holds */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coca_edge.h"

static int checks = 0, failures = 0;

#define CHECK(expr)                                                                    \
    do {                                                                               \
        checks++;                                                                      \
        if (!(expr)) {                                                                 \
            failures++;                                                                \
            fprintf(stderr, "FAILED line %d: %s (last error: %s)\n", __LINE__, #expr, \
                    coca_last_error());                                                \
        }                                                                              \
    } while (0)

static int log_lines = 0;
static void on_log(int32_t level, const char *message, void *user) {
    (void)level;
    (void)message;
    (void)user;
    log_lines++;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s BUNDLE HEAD HEAD_OF_ANOTHER_BUNDLE\n", argv[0]);
        return 2;
    }
    const char *bundle = argv[1];

    /* library-level */
    CHECK(strlen(coca_version()) > 0);
    CHECK(coca_abi_version() == 1);
    CHECK(coca_set_log_callback(on_log, COCA_LOG_DEBUG, NULL) == COCA_STATUS_OK);
    CHECK(coca_options_default(NULL) == COCA_STATUS_NULL_POINTER);
    CHECK(strstr(coca_last_error(), "null") != NULL);
    char small[8];
    size_t need = coca_last_error_copy(small, sizeof small);
    CHECK(need > sizeof small && strlen(small) == sizeof small - 1);
    CHECK(coca_last_error_copy(NULL, 0) == need);

    /* opening */
    CocaOptions opts;
    CHECK(coca_options_default(&opts) == COCA_STATUS_OK);
    opts.threads = 1;
    opts.label_cache = 0;
    CocaModel *model = NULL;
    CHECK(coca_model_open(NULL, &opts, &model) == COCA_STATUS_NULL_POINTER && model == NULL);
    CHECK(coca_model_open(bundle, &opts, NULL) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_open("\xff\xfe", &opts, &model) == COCA_STATUS_INVALID_UTF8 && model == NULL);
    CHECK(coca_model_open("/nonexistent/bundle", &opts, &model) == COCA_STATUS_IO && model == NULL);
    CHECK(coca_model_open(argv[0], &opts, &model) == COCA_STATUS_BUNDLE && model == NULL); /* a file */
    CocaOptions bad = opts;
    bad.struct_size = 3;
    CHECK(coca_model_open(bundle, &bad, &model) == COCA_STATUS_INVALID_ARGUMENT && model == NULL);
    bad = opts;
    bad.backend = "tpu";
    CHECK(coca_model_open(bundle, &bad, &model) == COCA_STATUS_INVALID_ARGUMENT && model == NULL);
    bad = opts;
    bad.precision = "\xc3\x28";
    CHECK(coca_model_open(bundle, &bad, &model) == COCA_STATUS_INVALID_UTF8 && model == NULL);
    bad = opts;
    bad.board = "toaster";
    CHECK(coca_model_open(bundle, &bad, &model) == COCA_STATUS_INVALID_ARGUMENT && model == NULL);
    CHECK(strstr(coca_last_error(), "raspberry-pi-5") != NULL);
    bad = opts;
    bad.board = "\xff";
    CHECK(coca_model_open(bundle, &bad, &model) == COCA_STATUS_INVALID_UTF8 && model == NULL);
    bad = opts;
    bad.precision = "int3";
    CHECK(coca_model_open(bundle, &bad, &model) == COCA_STATUS_INVALID_ARGUMENT && model == NULL);
    CHECK(strstr(coca_last_error(), "int3") != NULL);
    CHECK(coca_model_open(bundle, &opts, &model) == COCA_STATUS_OK && model != NULL);
    CHECK(strcmp(coca_last_error(), "") == 0);

    /* embed dim */
    size_t dim = 0;
    CHECK(coca_model_embed_dim(NULL, &dim) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_embed_dim(model, NULL) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_embed_dim(model, &dim) == COCA_STATUS_OK && dim > 0);

    /* labels */
    const char *labels[] = {"cat", "dog", "traffic cone"};
    const char *bad_utf8[] = {"cat", "\xff"};
    const char *with_null[] = {"cat", NULL};
    const char *dup[] = {"cat", "cat"};
    const char *no_placeholder[] = {"a photo"};
    const char *templates[] = {"a photo of a {}.", "{}"};
    CHECK(coca_model_set_labels(NULL, labels, 3, NULL, 0) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_set_labels(model, NULL, 3, NULL, 0) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_set_labels(model, labels, 0, NULL, 0) == COCA_STATUS_LABELS);
    CHECK(coca_model_set_labels(model, bad_utf8, 2, NULL, 0) == COCA_STATUS_INVALID_UTF8);
    CHECK(coca_model_set_labels(model, with_null, 2, NULL, 0) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_set_labels(model, dup, 2, NULL, 0) == COCA_STATUS_LABELS);
    CHECK(coca_model_set_labels(model, labels, 3, NULL, 2) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_set_labels(model, labels, 3, no_placeholder, 1) == COCA_STATUS_LABELS);
    CHECK(coca_model_set_labels(model, labels, (size_t)-1, NULL, 0) == COCA_STATUS_INVALID_ARGUMENT);

    /* processing before labels: embedding only is fine, top-k is not */
    enum { W = 64, H = 48 };
    static unsigned char rgb[W * H * 3];
    for (size_t i = 0; i < sizeof rgb; i++) rgb[i] = (unsigned char)(i * 7 % 251);
    CocaResult *result = NULL;
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 3, &result) == COCA_STATUS_NO_LABELS && result == NULL);
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 0, &result) == COCA_STATUS_OK && result != NULL);
    coca_result_free(&result);
    CHECK(result == NULL);

    CHECK(coca_model_set_labels(model, labels, 3, templates, 2) == COCA_STATUS_OK);
    CHECK(coca_model_process(NULL, rgb, sizeof rgb, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 3, &result) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_process(model, NULL, sizeof rgb, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 3, &result) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 3, NULL) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_process(model, rgb, sizeof rgb - 1, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 3, &result) == COCA_STATUS_IMAGE && result == NULL);
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H, W * 3 - 1, COCA_PIXEL_FORMAT_RGB8, 3, &result) == COCA_STATUS_IMAGE);
    CHECK(coca_model_process(model, rgb, sizeof rgb, 0, H, 0, COCA_PIXEL_FORMAT_RGB8, 3, &result) == COCA_STATUS_IMAGE);
    CHECK(coca_model_process(model, rgb, sizeof rgb, 100000, 100000, 0, COCA_PIXEL_FORMAT_RGB8, 3, &result) == COCA_STATUS_IMAGE);
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H, 0, (CocaPixelFormat)42, 3, &result) == COCA_STATUS_INVALID_ARGUMENT);
    CHECK(coca_model_process(model, rgb, sizeof rgb, W + 1, H, 0, COCA_PIXEL_FORMAT_YUYV, 3, &result) == COCA_STATUS_IMAGE);
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H + 1, 0, COCA_PIXEL_FORMAT_NV12, 3, &result) == COCA_STATUS_IMAGE);
    CHECK(result == NULL);

    /* every pixel format on a valid buffer */
    int formats[] = {COCA_PIXEL_FORMAT_RGB8, COCA_PIXEL_FORMAT_RGBA8, COCA_PIXEL_FORMAT_BGR8,
                     COCA_PIXEL_FORMAT_GRAY8, COCA_PIXEL_FORMAT_YUYV, COCA_PIXEL_FORMAT_NV12};
    unsigned widths[] = {W, W * 3 / 4, W, W * 3, W * 3 / 2, W * 2};
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++) {
        /* the same buffer read with a different width per format so the sizes fit */
        unsigned h = formats[i] == COCA_PIXEL_FORMAT_NV12 ? 32 : H;
        CHECK(coca_model_process(model, rgb, sizeof rgb, widths[i], h, 0, (CocaPixelFormat)formats[i], 2, &result) == COCA_STATUS_OK);
        coca_result_free(&result);
    }

    /* heads: loaded from a file, refused for another bundle, scored from the same pass */
    CHECK(coca_model_set_head(NULL, argv[2]) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_set_head(model, "\xff") == COCA_STATUS_INVALID_UTF8);
    CHECK(coca_model_set_head(model, "/nonexistent/head.json") == COCA_STATUS_IO);
    CHECK(coca_model_set_head(model, argv[0]) == COCA_STATUS_LABELS); /* not a head file */
    CHECK(coca_model_set_head(model, argv[3]) == COCA_STATUS_LABELS);
    CHECK(strstr(coca_last_error(), "trained on bundle") != NULL);
    CHECK(coca_model_set_head(model, argv[2]) == COCA_STATUS_OK);
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 2, &result) == COCA_STATUS_OK);
    {
        CocaLabelScore head[4], zs[4];
        size_t nh = 99, nz = 99;
        CHECK(coca_result_head_labels(NULL, head, 4, &nh) == COCA_STATUS_NULL_POINTER);
        CHECK(coca_result_head_labels(result, head, 4, NULL) == COCA_STATUS_NULL_POINTER);
        CHECK(coca_result_head_labels(result, NULL, 4, &nh) == COCA_STATUS_NULL_POINTER);
        CHECK(coca_result_head_labels(result, head, 4, &nh) == COCA_STATUS_OK && nh == 2);
        CHECK(head[0].label != NULL && head[0].probability >= head[1].probability && head[0].probability + head[1].probability <= 1.0001f);
        CHECK(coca_result_labels(result, zs, 4, &nz) == COCA_STATUS_OK && nz == 2);
    }
    coca_result_free(&result);
    CHECK(coca_model_set_head(model, NULL) == COCA_STATUS_OK);
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 2, &result) == COCA_STATUS_OK);
    {
        CocaLabelScore head[2];
        size_t nh = 99;
        CHECK(coca_result_head_labels(result, head, 2, &nh) == COCA_STATUS_OK && nh == 0);
    }
    coca_result_free(&result);

    /* results */
    CHECK(coca_model_process(model, rgb, sizeof rgb, W, H, 0, COCA_PIXEL_FORMAT_RGB8, 2, &result) == COCA_STATUS_OK);
    float *emb = calloc(dim, sizeof(float));
    size_t n = 12345;
    CHECK(coca_result_embedding(NULL, emb, dim, &n) == COCA_STATUS_NULL_POINTER && n == 12345);
    CHECK(coca_result_embedding(result, emb, dim - 1, &n) == COCA_STATUS_BUFFER_TOO_SMALL && n == dim && emb[0] == 0.0f);
    CHECK(coca_result_embedding(result, NULL, dim, &n) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_result_embedding(result, emb, dim, NULL) == COCA_STATUS_OK);
    double norm = 0;
    for (size_t i = 0; i < dim; i++) norm += (double)emb[i] * emb[i];
    CHECK(norm > 0.999 && norm < 1.001);
    CocaLabelScore scores[4];
    CHECK(coca_result_labels(NULL, scores, 4, &n) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_result_labels(result, scores, 4, NULL) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_result_labels(result, NULL, 4, &n) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_result_labels(result, NULL, 0, &n) == COCA_STATUS_OK && n == 0);
    CHECK(coca_result_labels(result, scores, 4, &n) == COCA_STATUS_OK && n == 2);
    CHECK(scores[0].probability >= scores[1].probability && scores[0].index < 3 && strlen(scores[0].label) > 0);
    free(emb);

    /* captions */
    CocaCaptionOptions copts;
    CHECK(coca_caption_options_default(NULL) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_caption_options_default(&copts) == COCA_STATUS_OK && copts.beams == 6);
    char text[2048];
    size_t needed = 0;
    CHECK(coca_model_caption(NULL, result, &copts, text, sizeof text, &needed) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_caption(model, NULL, &copts, text, sizeof text, &needed) == COCA_STATUS_NULL_POINTER);
    CocaCaptionOptions bad_c = copts;
    bad_c.search = 9;
    CHECK(coca_model_caption(model, result, &bad_c, text, sizeof text, &needed) == COCA_STATUS_INVALID_ARGUMENT);
    bad_c = copts;
    bad_c.beams = 0;
    CHECK(coca_model_caption(model, result, &bad_c, text, sizeof text, &needed) == COCA_STATUS_INVALID_ARGUMENT);
    bad_c = copts;
    bad_c.max_tokens = 0;
    CHECK(coca_model_caption(model, result, &bad_c, text, sizeof text, &needed) == COCA_STATUS_INVALID_ARGUMENT);
    bad_c = copts;
    bad_c.struct_size = 1;
    CHECK(coca_model_caption(model, result, &bad_c, text, sizeof text, &needed) == COCA_STATUS_INVALID_ARGUMENT);
    copts.search = COCA_SEARCH_GREEDY;
    CHECK(coca_model_caption(model, result, &copts, text, 1, &needed) == COCA_STATUS_BUFFER_TOO_SMALL && needed > 1);
    CHECK(coca_model_caption(model, result, &copts, NULL, sizeof text, &needed) == COCA_STATUS_NULL_POINTER);
    CHECK(coca_model_caption(model, result, &copts, text, needed, NULL) == COCA_STATUS_OK && strlen(text) + 1 == needed);
    CHECK(coca_model_caption(model, result, NULL, text, sizeof text, NULL) == COCA_STATUS_OK);

    /* frees accept null */
    coca_result_free(&result);
    coca_result_free(&result);
    coca_result_free(NULL);
    coca_model_free(&model);
    CHECK(model == NULL);
    coca_model_free(&model);
    coca_model_free(NULL);
    CHECK(coca_set_log_callback(NULL, 0, NULL) == COCA_STATUS_OK);
    CHECK(log_lines > 0);

    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
