/* Bad input through libchat's C ABI, run by tests/c_abi.rs against the real model:
 *
 *   abi_errors MODEL_DIR            every misuse and refusal, then a good request on the same engine
 *   abi_errors MODEL_DIR runtime    a missing ONNX Runtime (must be the process's first engine)
 *   abi_errors MODEL_DIR free       chat_engine_free while streams are in flight
 *
 * Prints "ok" and exits 0 when every check holds; otherwise names the failed check.
 */
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libchat.h>

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

static char model_dir[4096];

static const char *last_error(void) {
    static char buf[4096];
    size_t len = chat_last_error(buf, sizeof buf);
    CHECK(len < sizeof buf && strlen(buf) == len);
    return buf;
}

/* `status` is `want`, and the thread's last error mentions `needle`. */
#define EXPECT(status, want, needle)                                                              \
    do {                                                                                          \
        chat_status got_ = (status);                                                              \
        if (got_ != (want) || !strstr(last_error(), (needle))) {                                 \
            fprintf(stderr, "%s:%d: got %s (\"%s\"), wanted %s mentioning \"%s\"\n", __FILE__,   \
                    __LINE__, chat_status_str(got_), last_error(), chat_status_str(want), needle); \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

static chat_engine *new_engine(const char *extra) {
    char config[4400];
    snprintf(config, sizeof config, "{\"model\": \"%s\"%s}", model_dir, extra);
    chat_engine *engine = NULL;
    chat_status status = chat_engine_new(config, &engine);
    if (status != CHAT_OK) {
        fprintf(stderr, "chat_engine_new: %s: %s\n", chat_status_str(status), last_error());
        exit(1);
    }
    return engine;
}

static const char *GOOD = "{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], "
                          "\"max_tokens\": 16, \"temperature\": 0}";

struct counter {
    int pieces;
    int stop_after; /* 0: never */
    char text[8192];
};

static bool collect(void *userdata, const char *text, size_t len) {
    struct counter *c = userdata;
    CHECK(text[len] == '\0');
    strncat(c->text, text, sizeof c->text - strlen(c->text) - 1);
    c->pieces++;
    return c->stop_after == 0 || c->pieces < c->stop_after;
}

/* A callback as a program in another language may write it: returning a byte that is neither
 * 0 nor 1 (here 2, through a function declared to return unsigned char). libchat reads the
 * byte, so any value but 0 goes on: this call must simply complete. */
static unsigned char returns_two(void *userdata, const char *text, size_t len) {
    (void)text;
    (void)len;
    ++*(int *)userdata;
    return 2;
}

/* Every value outside an enum that a function takes, as C can pass it. */
static void values_outside_the_enums(chat_engine *engine) {
    int outside[] = {-1, CHAT_PANIC + 1, 15, 99, 1000, INT_MAX, INT_MIN};
    for (size_t i = 0; i < sizeof outside / sizeof outside[0]; i++)
        CHECK(strcmp(chat_status_str(outside[i]), "unknown status") == 0);
    for (int s = CHAT_OK; s <= CHAT_PANIC; s++)
        CHECK(strcmp(chat_status_str(s), "unknown status") != 0);
    int pieces = 0;
    char *out = NULL;
    /* Calling through a pointer of another function type is what a foreign binding does. */
    chat_delta_fn two = (chat_delta_fn)(void (*)(void))returns_two;
    EXPECT(chat_engine_chat_stream(engine, GOOD, two, &pieces, &out), CHAT_OK, "");
    CHECK(out && pieces > 1 && strstr(out, "Paris"));
    chat_string_free(out);
}

static void misuse_and_refusals(void) {
    char *out = (char *)0x1; /* must stay untouched on failure */
    chat_engine *engine = (chat_engine *)0x1;

    /* chat_engine_new */
    EXPECT(chat_engine_new(NULL, &engine), CHAT_INVALID_ARGUMENT, "config_json");
    EXPECT(chat_engine_new("{}", NULL), CHAT_INVALID_ARGUMENT, "engine_out");
    EXPECT(chat_engine_new("{not json", &engine), CHAT_INVALID_CONFIG, "not valid JSON");
    EXPECT(chat_engine_new("{}", &engine), CHAT_INVALID_CONFIG, "no model folder");
    EXPECT(chat_engine_new("{\"model\": \"/x\", \"colour\": 1}", &engine), CHAT_INVALID_CONFIG, "colour");
    EXPECT(chat_engine_new("{\"model\": \"/x\", \"threads\": \"many\"}", &engine), CHAT_INVALID_CONFIG, "threads");
    EXPECT(chat_engine_new("{\"model\": \"/nonexistent-model\"}", &engine), CHAT_MODEL_LOAD_FAILED, "does not exist");
    EXPECT(chat_engine_new("{\"model\": \"/tmp\"}", &engine), CHAT_MODEL_LOAD_FAILED, "tokenizer.json");
    CHECK(engine == (chat_engine *)0x1);

    engine = new_engine(", \"max_running\": 2");
    CHECK(last_error()[0] == '\0');

    /* NULL arguments */
    EXPECT(chat_engine_chat(NULL, GOOD, &out), CHAT_INVALID_ARGUMENT, "engine");
    EXPECT(chat_engine_chat(engine, NULL, &out), CHAT_INVALID_ARGUMENT, "request_json");
    EXPECT(chat_engine_chat(engine, GOOD, NULL), CHAT_INVALID_ARGUMENT, "response_json_out");
    EXPECT(chat_engine_chat_stream(engine, GOOD, NULL, NULL, &out), CHAT_INVALID_ARGUMENT, "on_delta");
    EXPECT(chat_engine_complete(NULL, GOOD, &out), CHAT_INVALID_ARGUMENT, "engine");

    /* Bad requests, the same classes as the HTTP API's */
    EXPECT(chat_engine_chat(engine, "{\"messages\": [", &out), CHAT_INVALID_REQUEST, "JSON");
    EXPECT(chat_engine_chat(engine, "[1, 2]", &out), CHAT_INVALID_REQUEST, "JSON object");
    EXPECT(chat_engine_chat(engine, "\xff\xfe", &out), CHAT_INVALID_ARGUMENT, "UTF-8");
    EXPECT(chat_engine_chat(engine, "{}", &out), CHAT_INVALID_REQUEST, "messages");
    EXPECT(chat_engine_chat(engine, "{\"messages\": \"hi\"}", &out), CHAT_INVALID_REQUEST, "messages");
    EXPECT(chat_engine_chat(engine,
                            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": \"ten\"}",
                            &out),
           CHAT_INVALID_REQUEST, "max_tokens");
    EXPECT(chat_engine_chat(engine,
                            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"temperature\": -1}",
                            &out),
           CHAT_INVALID_REQUEST, "temperature");
    EXPECT(chat_engine_chat(engine, "{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}", &out),
           CHAT_INVALID_REQUEST, "role");
    EXPECT(chat_engine_chat(engine,
                            "{\"model\": \"gpt-9\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
                            &out),
           CHAT_MODEL_NOT_FOUND, "gpt-9");
    EXPECT(chat_engine_chat(engine,
                            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 100000000}",
                            &out),
           CHAT_CONTEXT_LENGTH_EXCEEDED, "context length");
    EXPECT(chat_engine_chat(engine, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"n\": 3}", &out),
           CHAT_INVALID_REQUEST, "n must be between 1 and 2");
    EXPECT(chat_engine_complete(engine, "{\"prompt\": 7}", &out), CHAT_INVALID_REQUEST, "prompt");
    struct counter c = {0};
    EXPECT(chat_engine_chat_stream(engine,
                                   "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"n\": 2}",
                                   collect, &c, &out),
           CHAT_INVALID_REQUEST, "n > 1");
    CHECK(c.pieces == 0);
    CHECK(out == (char *)0x1);

    /* A callback that cancels after the first piece */
    struct counter cancel = {.stop_after = 1};
    EXPECT(chat_engine_chat_stream(engine, GOOD, collect, &cancel, &out), CHAT_CANCELLED, "after 1 piece");
    CHECK(cancel.pieces == 1 && out == (char *)0x1);

    /* chat_last_error: the full length is returned whatever the buffer */
    chat_engine_chat(engine, "{}", &out);
    size_t full = chat_last_error(NULL, 0);
    CHECK(full > 8);
    char small[8];
    CHECK(chat_last_error(small, sizeof small) == full);
    CHECK(strlen(small) == sizeof small - 1);

    /* The engine still answers, streamed and not, and the pieces make the answer */
    struct counter stream = {0};
    out = NULL;
    EXPECT(chat_engine_chat_stream(engine, GOOD, collect, &stream, &out), CHAT_OK, "");
    CHECK(out && strstr(out, "\"chat.completion\"") && strstr(out, "Paris") && stream.pieces > 1);
    CHECK(strstr(out, stream.text)); /* JSON escaping aside, the streamed text is the content */
    chat_string_free(out);
    out = NULL;
    EXPECT(chat_engine_chat(engine, GOOD, &out), CHAT_OK, "");
    CHECK(out && strstr(out, "Paris") && strstr(out, "\"usage\""));
    chat_string_free(out);
    out = NULL;
    EXPECT(chat_engine_complete(engine, "{\"prompt\": \"The capital of France is\", \"max_tokens\": 4}", &out),
           CHAT_OK, "");
    CHECK(out && strstr(out, "\"text_completion\""));
    chat_string_free(out);

    /* The static strings */
    for (int s = CHAT_OK; s <= CHAT_PANIC; s++)
        CHECK(chat_status_str(s) && chat_status_str(s)[0]);
    CHECK(strcmp(chat_status_str(CHAT_OK), "ok") == 0);
    values_outside_the_enums(engine);
    char version[32];
    snprintf(version, sizeof version, "%d.%d.%d", LIBCHAT_VERSION_MAJOR, LIBCHAT_VERSION_MINOR,
             LIBCHAT_VERSION_PATCH);
    CHECK(strcmp(chat_version(), version) == 0);

    chat_string_free(NULL);
    chat_engine_free(NULL);
    chat_engine_free(engine);
}

static void runtime_missing(void) {
    char config[4400];
    snprintf(config, sizeof config, "{\"model\": \"%s\", \"onnxruntime\": \"/nonexistent/libonnxruntime.so\"}",
             model_dir);
    chat_engine *engine = NULL;
    EXPECT(chat_engine_new(config, &engine), CHAT_RUNTIME_MISSING, "/nonexistent/libonnxruntime.so");
    CHECK(engine == NULL);
}

/* chat_engine_free waits for streams in flight, which then finish normally. */
struct flight {
    const chat_engine *engine;
    struct counter counter;
    volatile int started, finished;
    chat_status status;
    char *response;
};

static bool flight_piece(void *userdata, const char *text, size_t len) {
    struct flight *f = userdata;
    (void)text;
    (void)len;
    f->started = 1;
    usleep(2000);
    return true;
}

static void *fly(void *arg) {
    struct flight *f = arg;
    f->status = chat_engine_chat_stream(
        f->engine,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Tell me a story.\"}], \"max_tokens\": 40, "
        "\"ignore_eos\": true, \"temperature\": 0}",
        flight_piece, f, &f->response);
    f->finished = 1;
    return NULL;
}

static void free_in_flight(void) {
    chat_engine *engine = new_engine("");
    enum { N = 3 };
    struct flight flights[N];
    pthread_t threads[N];
    for (int i = 0; i < N; i++) {
        flights[i] = (struct flight){.engine = engine};
        CHECK(pthread_create(&threads[i], NULL, fly, &flights[i]) == 0);
    }
    for (int i = 0; i < N; i++)
        while (!flights[i].started)
            usleep(1000);
    chat_engine_free(engine);
    for (int i = 0; i < N; i++) {
        CHECK(flights[i].finished); /* free returned only after every call had */
        pthread_join(threads[i], NULL);
        CHECK(flights[i].status == CHAT_OK);
        CHECK(strstr(flights[i].response, "\"completion_tokens\":40"));
        chat_string_free(flights[i].response);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [runtime|free]\n", argv[0]);
        return 2;
    }
    snprintf(model_dir, sizeof model_dir, "%s", argv[1]);
    const char *mode = argc > 2 ? argv[2] : "all";
    if (strcmp(mode, "runtime") == 0)
        runtime_missing();
    else if (strcmp(mode, "free") == 0)
        free_in_flight();
    else
        misuse_and_refusals();
    printf("ok\n");
    return 0;
}
