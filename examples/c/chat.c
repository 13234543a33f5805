/* One question to a local model through libchat, the answer streamed to stdout as it is generated.
 *
 *   cc chat.c $(pkg-config --cflags --libs libchat) -o chat
 *   ./chat MODEL_DIR ["question"] [--print-response]
 *
 * --print-response prints the final response JSON (with usage and finish_reason) after the answer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libchat.h>

/* Prints each piece as it arrives; returning true asks for more. */
static bool print_piece(void *userdata, const char *text, size_t len) {
    (void)userdata;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return true;
}

/* Writes `s` as a JSON string literal (quotes and escapes included). */
static void json_string(char *out, size_t cap, const char *s) {
    size_t n = 0;
    out[n++] = '"';
    for (; *s && n + 8 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c < 0x20) {
            n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
        } else {
            out[n++] = (char)c;
        }
    }
    out[n++] = '"';
    out[n] = '\0';
}

static int fail(const char *what, chat_status status) {
    char message[1024];
    chat_last_error(message, sizeof message);
    fprintf(stderr, "%s: %s: %s\n", what, chat_status_str(status), message);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [\"question\"] [--print-response]\n", argv[0]);
        return 2;
    }
    const char *question = "What is the capital of France?";
    int print_response = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--print-response") == 0)
            print_response = 1;
        else
            question = argv[i];
    }

    char model[4096], config[4200];
    json_string(model, sizeof model, argv[1]);
    snprintf(config, sizeof config, "{\"model\": %s}", model);
    chat_engine *engine = NULL;
    chat_status status = chat_engine_new(config, &engine);
    if (status != CHAT_OK)
        return fail("loading the model", status);

    char content[8192], request[8400];
    json_string(content, sizeof content, question);
    snprintf(request, sizeof request,
             "{\"messages\": [{\"role\": \"user\", \"content\": %s}], \"max_tokens\": 64, \"temperature\": 0}",
             content);
    char *response = NULL;
    status = chat_engine_chat_stream(engine, request, print_piece, NULL, &response);
    if (status != CHAT_OK) {
        fail("asking", status);
        chat_engine_free(engine);
        return 1;
    }
    printf("\n");
    if (print_response)
        printf("%s\n", response);
    chat_string_free(response);
    chat_engine_free(engine);
    return 0;
}
