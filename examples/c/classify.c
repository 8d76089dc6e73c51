/* Classify a raw RGB frame with coca-edge from C.
 *
 *   examples/c/build.sh
 *   target/release/coca_classify_c BUNDLE FRAME.rgb WIDTH HEIGHT LABEL [LABEL...]
 *
 * FRAME.rgb holds WIDTH*HEIGHT*3 bytes (e.g. `ffmpeg -i photo.jpg -f rawvideo -pix_fmt rgb24
 * frame.rgb`). Prints the top labels with probabilities, the first embedding values and a
 * caption (beam search), all from one encoder pass.
 * Exit codes: 0 ok, 2 error (the message on stderr). */
#include <stdio.h>
#include <stdlib.h>

#include "coca_edge.h"

static int fail(const char *what) {
    char msg[512];
    coca_last_error_copy(msg, sizeof msg);
    fprintf(stderr, "coca_classify_c: %s: %s\n", what, msg);
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s BUNDLE FRAME.rgb WIDTH HEIGHT LABEL [LABEL...]\n", argv[0]);
        return 2;
    }
    unsigned width = (unsigned)strtoul(argv[3], NULL, 10), height = (unsigned)strtoul(argv[4], NULL, 10);
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        perror(argv[2]);
        return 2;
    }
    size_t len = (size_t)width * height * 3;
    unsigned char *pixels = malloc(len ? len : 1);
    size_t got = pixels ? fread(pixels, 1, len, f) : 0;
    fclose(f);
    if (got != len) {
        fprintf(stderr, "coca_classify_c: %s: expected %zu bytes, read %zu\n", argv[2], len, got);
        free(pixels);
        return 2;
    }

    CocaOptions options;
    coca_options_default(&options);
    options.threads = 1;
    options.label_cache = 0;
    CocaModel *model = NULL;
    CocaResult *result = NULL;
    float *embedding = NULL;
    int rc = 0;
    if (coca_model_open(argv[1], &options, &model) != COCA_STATUS_OK) {
        rc = fail("open");
        goto done;
    }
    if (coca_model_set_labels(model, (const char *const *)&argv[5], (size_t)(argc - 5), NULL, 0) != COCA_STATUS_OK) {
        rc = fail("labels");
        goto done;
    }
    if (coca_model_process(model, pixels, len, width, height, 0, COCA_PIXEL_FORMAT_RGB8, 3, &result) != COCA_STATUS_OK) {
        rc = fail("process");
        goto done;
    }
    CocaLabelScore top[3];
    size_t n = 0;
    coca_result_labels(result, top, 3, &n);
    for (size_t i = 0; i < n; i++)
        printf("%.4f %s\n", top[i].probability, top[i].label);
    size_t dim = 0;
    coca_model_embed_dim(model, &dim);
    embedding = malloc(dim * sizeof(float));
    if (!embedding || coca_result_embedding(result, embedding, dim, &n) != COCA_STATUS_OK) {
        rc = fail("embedding");
        goto done;
    }
    printf("embedding %zu: %.6f %.6f %.6f\n", n, embedding[0], embedding[1], embedding[2]);
    char caption[4096];
    size_t needed = 0;
    CocaStatus st = coca_model_caption(model, result, NULL, caption, sizeof caption, &needed);
    if (st == COCA_STATUS_OK)
        printf("caption: %s\n", caption);
    else if (st != COCA_STATUS_BUNDLE) /* a bundle without decoder graphs cannot caption */
        rc = fail("caption");
done:
    free(embedding);
    free(pixels);
    coca_result_free(&result);
    coca_model_free(&model);
    return rc;
}
