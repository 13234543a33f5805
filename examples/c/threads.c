/* Eight threads share one engine: their requests are scheduled and batched together, and each
 * thread gets its own answer.
 *
 *   cc threads.c $(pkg-config --cflags --libs libchat) -lpthread -o threads
 *   ./threads MODEL_DIR [MAX_TOKENS]
 *   ./threads '{"model": "MODEL_DIR", "threads": 1}' [MAX_TOKENS]     (a whole engine config)
 *
 * Prints one line per thread: "[i] question -> answer". Exits 1 if any request failed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libchat.h>

#define THREADS 8

static const char *const QUESTIONS[THREADS] = {
    "What is the capital of France?", "Name a primary color.",   "What is 2 + 2?",
    "Say hello in Spanish.",          "What do bees make?",      "What is the opposite of hot?",
    "Which planet do we live on?",    "How many days are in a week?",
};

struct job {
    const chat_engine *engine; /* shared: chat_engine_chat takes a const pointer */
    int index;
    int max_tokens;
    char *response; /* owned by the job until main frees it with chat_string_free */
    chat_status status;
    char error[512];
};

static void *ask(void *arg) {
    struct job *job = arg;
    char request[512];
    snprintf(request, sizeof request,
             "{\"messages\": [{\"role\": \"user\", \"content\": \"%s\"}], \"max_tokens\": %d, \"temperature\": 0}",
             QUESTIONS[job->index], job->max_tokens);
    job->status = chat_engine_chat(job->engine, request, &job->response);
    if (job->status != CHAT_OK)
        chat_last_error(job->error, sizeof job->error); /* per thread: read it on the failing thread */
    return NULL;
}

/* The message content of a chat.completion, unescaped enough for display (no JSON library here). */
static void print_content(const char *response) {
    const char *p = strstr(response, "\"content\":\"");
    if (!p) {
        printf("%s", response);
        return;
    }
    for (p += strlen("\"content\":\""); *p && *p != '"'; p++) {
        if (*p == '\\' && p[1]) {
            p++;
            putchar(*p == 'n' ? ' ' : *p);
        } else {
            putchar(*p);
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR|CONFIG_JSON [MAX_TOKENS]\n", argv[0]);
        return 2;
    }
    int max_tokens = argc > 2 ? atoi(argv[2]) : 48;
    char config[4200];
    if (argv[1][0] == '{')
        snprintf(config, sizeof config, "%s", argv[1]);
    else
        snprintf(config, sizeof config, "{\"model\": \"%s\"}", argv[1]); /* a plain path: no quotes inside */
    chat_engine *engine = NULL;
    chat_status status = chat_engine_new(config, &engine);
    if (status != CHAT_OK) {
        char message[1024];
        chat_last_error(message, sizeof message);
        fprintf(stderr, "loading the model: %s: %s\n", chat_status_str(status), message);
        return 1;
    }

    struct job jobs[THREADS];
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) {
        jobs[i] = (struct job){.engine = engine, .index = i, .max_tokens = max_tokens};
        if (pthread_create(&threads[i], NULL, ask, &jobs[i]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            return 1;
        }
    }
    int failed = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        if (jobs[i].status != CHAT_OK) {
            fprintf(stderr, "[%d] %s: %s\n", i, chat_status_str(jobs[i].status), jobs[i].error);
            failed = 1;
            continue;
        }
        printf("[%d] %s -> ", i, QUESTIONS[i]);
        print_content(jobs[i].response);
        printf("\n");
        chat_string_free(jobs[i].response);
    }
    chat_engine_free(engine);
    return failed;
}
