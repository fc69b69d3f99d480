/*
 * fleetline_auth: per-device credentials and topic ACLs for Mosquitto 2.0 (plugin API 5).
 *
 * Devices (docs/protocol.md, section 1): client id = username = device id; the password is the
 * device key (base64 of 32 bytes) or a SAS token
 *     sig=<base64 hmac-sha256(key_bytes, "{device_id}\n{expiry}")>&se=<expiry epoch s>
 * where key = HMAC-SHA256(secret, "{device_id}\n{key_version}") and key_version comes
 * from the registry (devices.key_version; 0 = no key issued). The arithmetic is that of
 * fleetline/devicekeys.py, which is the reference.
 * A device may read, write and subscribe only under "devices/{its id}/".
 *
 * Devices registered with X.509 identities (devices.auth, migration 0023) log in with a
 * client certificate on a TLS listener instead: "x509_self_signed", its SHA-256
 * thumbprint is the device's primary or secondary one; "x509_ca", its common name is the
 * device id and it is signed by the device's CA, verified in x509_cas. On a TLS listener
 * that does not require certificates the plugin asks every client for one (optional) and
 * accepts one that chains to nothing the listener trusts: the trust decision is this
 * plugin's, at CONNECT, from the registry (a listener that requires certificates keeps
 * its own verification). A certificate that is expired, not yet valid
 * or malformed still fails the handshake. A disabled device is refused.
 *
 * Service accounts (ingest, api, rules, test harnesses) are listed in a file of
 * "username:<hex sha256 of the password>" lines; they may use any client id and have
 * full access.
 *
 * A device's credentials are cached for plugin_opt_cache_seconds; when the database cannot be
 * reached, a cached value up to plugin_opt_stale_seconds old is used. The plugin LISTENs
 * on "fleetline_device_credentials" (migrations 0009, 0023): a notification drops the
 * device's cache entry and, at the next tick, disconnects the device if it is connected
 * under a credentials_version the registry no longer has
 * (mosquitto_kick_client_by_clientid). On "fleetline_x509_cas" it reloads the verified
 * CAs and disconnects the devices that logged in through one no longer there. Connected
 * devices are tracked by login and MOSQ_EVT_DISCONNECT: 2.0.11 must not be asked to kick
 * an offline session.
 *
 * Mosquitto is single-threaded: a database round trip blocks the whole broker. Queries
 * have a 2 s deadline; connecting is asynchronous, advanced by the tick without waiting
 * (a login that needs the database waits 0.5 s at most), gives up after 3 s and backs
 * off (0.5 s doubling to 10 s) after a failure.
 */

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define PLUGIN_NAME "fleetline_auth"
#define KEY_BYTES 32
#define B64_KEY_LEN 44 /* base64 of 32 bytes, with padding */
#define MIN_SECRET_BYTES 32
#define MAX_SECRET_BYTES (1024 * 1024)
#define DEVICE_ID_MAX 128
#define DEVICE_PREFIX "devices/"
#define NOTIFY_CHANNEL "fleetline_device_credentials"
#define CAS_CHANNEL "fleetline_x509_cas"
#define LIMITS_CHANNEL "fleetline_device_limits"
#define PARENT_CHANNEL "fleetline_device_parent"
/* Refusals are added to device_limit_refusals this often, and logged once a minute per
 * device at most. */
#define REFUSALS_FLUSH_MS 5000
#define REFUSALS_LOG_MS 60000
/* Provisioning logins: this + "{enrollment id}/{registration id}". */
#define PROVISION_PREFIX "$provision/"
#define PROVISIONING_TOPIC "provisioning/"
#define DEFAULT_CACHE_SECONDS 5
#define DEFAULT_STALE_SECONDS 600
#define CONNECT_TIMEOUT_MS 3000
#define QUERY_TIMEOUT_MS 2000
#define LOGIN_CONNECT_WAIT_MS 500
#define BACKOFF_MIN_MS 500
#define BACKOFF_MAX_MS 10000
#define DRAIN_INTERVAL_MS 100
#define PRUNE_INTERVAL_MS 10000
#define REVALIDATE_BATCH 5000 /* connected devices checked per tick after a reconnection */
#define LOG_FIELD_MAX 160
/* A SAS token may be valid this long at most (plugin_opt_max_token_seconds): the API
 * signs tokens for up to 366 days. TOKEN_CLOCK_SLACK_SECONDS more are allowed for the
 * clocks of the signer and the broker (fleetline/devicekeys.py checks the same). */
#define DEFAULT_MAX_TOKEN_SECONDS (366LL * 24 * 3600)
#define TOKEN_CLOCK_SLACK_SECONDS 300
/* Failed device logins, per client id and source address: 5 free, then each further
 * attempt of that pair waits a backoff doubling from 1 s to 5 min (refused unchecked
 * meanwhile). An entry is forgotten 10 minutes after its last failure, or at the pair's
 * next good login. Only the pair is throttled: a device's id is no secret and devices
 * behind one NAT share an address, so neither alone may lock anyone out; and service
 * accounts, checked first, are never throttled (a stranger must not be able to lock
 * ingest out by using its client id). */
#define FAILURES_FREE_PER_PAIR 5
#define THROTTLE_MIN_MS 1000
#define THROTTLE_MAX_MS 300000
#define FAILURES_FORGET_MS 600000
#define FAILURES_MAX_TRACKED 100000
#define SUMMARY_INTERVAL_MS 60000
/* Denied device publishes logged per second at most (the rest are counted). */
#define DENIED_LOG_PER_SECOND 10
#define CHILD_KEY_MAX (2 * DEVICE_ID_MAX + 2) /* "{gateway}/{child}" */
#define REFUSED_CHILDREN_MAX 100000 /* refusals of unknown children remembered */
#define GATEWAY_REFUSALS_MAX 10000 /* (gateway, child) refusals waiting to be recorded */

/* How a device logs in (devices.auth). */
enum auth_kind { AUTH_KEY = 'k', AUTH_SELF_SIGNED = 's', AUTH_CA = 'c' };

/* A device's limits (device_limits, migration 0025); rate 0: none. */
struct limits {
	double messages_per_s, burst_messages, bytes_per_s, burst_bytes;
};

/* A device's token buckets, kept across its connections (a reconnection must not
 * refill them), and the publishes refused since they were last written down. */
struct bucket {
	double messages, bytes;
	int64_t at_ms;
	uint64_t refused_messages, refused_bytes;
	int64_t logged_ms; /* when its refusals were last logged */
};

/* What the plugin knows of a registered device. */
struct device_row {
	bool known; /* false: the registry has no such device */
	bool enabled;
	char auth; /* enum auth_kind */
	int key_version;
	int credentials; /* credentials_version */
	int nthumbs;
	unsigned char thumbs[2][SHA256_DIGEST_LENGTH];
	char ca[DEVICE_ID_MAX + 1]; /* x509_ca: the CA that signs its certificate */
	struct limits limits;
	bool gateway; /* it may use its children's topics (sessions keep it too) */
};

struct cache_entry {
	struct cache_entry *next;
	int64_t fetched_ms;
	/* failures: their count; sessions: the credentials_version the device logged in
	 * under */
	int version;
	struct device_row row; /* the device cache only */
	uint64_t ca_tag; /* sessions only: the CA its certificate was signed by (0: none) */
	struct limits limits; /* sessions only */
	struct bucket bucket; /* the buckets cache only */
	const struct mosquitto *client; /* sessions only: the connection */
	bool current; /* sessions only, while checking: the registry has this version */
	/* Owned, freed with the entry: children: the parent; refused children: the reason;
	 * gateway refusals: the reason, a NUL, the topic. */
	char *text;
	char id[];
};

struct cache {
	struct cache_entry **buckets;
	size_t nbuckets;
	size_t count;
};

struct service {
	char *username;
	unsigned char sha256[SHA256_DIGEST_LENGTH];
};

struct services {
	struct service *items;
	size_t count;
};

/* A verified CA (x509_cas): tag = the first 8 bytes of its SHA-256 thumbprint. */
struct ca {
	X509 *cert;
	uint64_t tag;
	char name[DEVICE_ID_MAX + 1];
};

/* A round over the connected devices, a batch per tick: their ids when it started, and
 * how many are done. */
struct id_round {
	char **ids; /* NULL: no round */
	size_t n;
	size_t done;
};

struct plugin {
	mosquitto_plugin_id_t *pid;
	char *conninfo;
	char *services_path;
	unsigned char *secret;
	size_t secret_len;
	struct services services;
	int64_t cache_ms;
	int64_t stale_ms;
	int64_t max_token_s;

	/* Failed device logins by "pair:<address>/<client id>": version = failures,
	 * fetched_ms = the last one. */
	struct cache failures;
	uint64_t refused_total, throttled_total, denied_total;
	uint64_t refused_reported, throttled_reported, denied_reported;
	int64_t next_summary_ms;
	int64_t denied_log_second;
	int denied_logged;

	PGconn *conn;
	bool connecting; /* conn is an attempt in progress (PQconnectPoll) */
	PostgresPollingStatusType connect_status;
	int64_t connect_deadline_ms;
	int64_t next_connect_ms;
	int64_t backoff_ms;
	bool reconnected;

	struct cache cache; /* device id -> its credentials, as last read */
	struct ca *cas; /* the verified CAs, as last read */
	size_t ncas;
	bool cas_stale; /* to read again (a notification, or a new connection) */
	struct cache buckets; /* device id -> its token buckets */
	bool limits_stale; /* the connected devices' limits are to be read again */
	int64_t next_limits_ms; /* after a failed round: not before this */
	struct id_round limits_round; /* ...theirs, a batch per tick */
	int64_t next_refusals_flush_ms;
	uint64_t limited_total, limited_reported;
	/* Gateways (docs/gateways.md). A child's parent, read while the database connection
	 * lasts (version = connection_epoch; each change is notified): "{child}" -> parent. */
	struct cache children;
	int connection_epoch; /* counts database connections */
	/* An id a gateway was refused (unknown, no parent, disabled), for cache_ms: "{child}"
	 * -> the gateway, a NUL, the reason (the last gateway refused it). */
	struct cache refused_children;
	char sqlstate[6]; /* of the last query that failed with an error result ("": none) */
	/* Refusals to add to gateway_refusals: "{gateway}/{child}" -> count (the bucket's
	 * refused_messages), the latest reason and topic. */
	struct cache gateway_refusals;
	uint64_t gateway_refused_total, gateway_refused_reported, gateway_unrecorded;
	int ssl_index; /* the SSL ex_data index whose new_func asks for certificates (-1) */
	/* Connected devices: id -> the connection and the credentials it logged in with.
	 * Only these are ever kicked: kicking the offline session of a persistent client
	 * corrupts Mosquitto 2.0.11's session list. */
	struct cache sessions;
	bool track_sessions; /* MOSQ_EVT_DISCONNECT and MOSQ_EVT_TICK are both available */
	char **kicks;
	size_t nkicks;
	size_t capkicks;
	struct id_round recheck; /* after a reconnection: connected devices to check */
	int64_t next_drain_ms;
	int64_t next_prune_ms;
	bool tick_registered;
	bool disconnect_registered;
};

enum lookup_result { LOOKUP_OK, LOOKUP_DB_ERROR };

/* ------------------------------------------------------------------------------------ */
/* Small helpers                                                                        */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A copy of an untrusted string that is safe to log: printable ASCII, bounded. */
static const char *printable(const char *in, char *out, size_t outlen)
{
	size_t i = 0;
	if(in == NULL){
		snprintf(out, outlen, "(none)");
		return out;
	}
	for(; in[i] && i + 4 < outlen; i++){
		unsigned char ch = (unsigned char)in[i];
		out[i] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
	}
	if(in[i]){
		out[i++] = '.';
		out[i++] = '.';
		out[i++] = '.';
	}
	out[i] = '\0';
	return out;
}

static void trim_newline(char *s)
{
	size_t n = strlen(s);
	while(n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ')){
		s[--n] = '\0';
	}
}

static bool valid_device_id(const char *id)
{
	size_t n = 0;
	for(; id[n]; n++){
		unsigned char ch = (unsigned char)id[n];
		if(n >= DEVICE_ID_MAX) return false;
		bool alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
		if(!(alnum || ch == '_' || ch == '.' || ch == ':' || ch == '-')) return false;
	}
	return n > 0;
}

static int hexval(int ch)
{
	if(ch >= '0' && ch <= '9') return ch - '0';
	if(ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
	if(ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
	return -1;
}

static const char *option(struct mosquitto_opt *opts, int count, const char *key)
{
	for(int i = 0; i < count; i++){
		if(opts[i].key && !strcmp(opts[i].key, key)){
			return opts[i].value;
		}
	}
	return NULL;
}

static bool parse_seconds_max(const char *text, int64_t *out, long long max)
{
	char *end;
	long long v;
	errno = 0;
	v = strtoll(text, &end, 10);
	if(errno || end == text || *end != '\0' || v < 0 || v > max){
		return false;
	}
	*out = (int64_t)v;
	return true;
}

static bool parse_seconds(const char *text, int64_t *out)
{
	return parse_seconds_max(text, out, 86400LL * 365);
}

/* ------------------------------------------------------------------------------------ */
/* Caches: chained hash tables keyed by device id                                      */

static uint64_t hash_id(const char *s)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	for(; *s; s++){
		h ^= (unsigned char)*s;
		h *= 1099511628211ULL;
	}
	return h;
}

static bool cache_init(struct cache *c)
{
	c->nbuckets = 1024;
	c->count = 0;
	c->buckets = mosquitto_calloc(c->nbuckets, sizeof(*c->buckets));
	return c->buckets != NULL;
}

static struct cache_entry *cache_find(struct cache *c, const char *id)
{
	struct cache_entry *e = c->buckets[hash_id(id) % c->nbuckets];
	for(; e; e = e->next){
		if(!strcmp(e->id, id)) return e;
	}
	return NULL;
}

static void cache_grow(struct cache *c)
{
	size_t n = c->nbuckets * 2;
	struct cache_entry **b = mosquitto_calloc(n, sizeof(*b));
	if(b == NULL) return; /* keep the longer chains */
	for(size_t i = 0; i < c->nbuckets; i++){
		struct cache_entry *e = c->buckets[i], *next;
		for(; e; e = next){
			size_t k = hash_id(e->id) % n;
			next = e->next;
			e->next = b[k];
			b[k] = e;
		}
	}
	mosquitto_free(c->buckets);
	c->buckets = b;
	c->nbuckets = n;
}

static struct cache_entry *cache_put(struct cache *c, const char *id, int version, int64_t now)
{
	struct cache_entry *e = cache_find(c, id);
	size_t len, k;
	if(e == NULL){
		len = strlen(id);
		e = mosquitto_malloc(sizeof(*e) + len + 1);
		if(e == NULL) return NULL; /* not cached: the next login asks the database again */
		memcpy(e->id, id, len + 1);
		e->text = NULL;
		k = hash_id(id) % c->nbuckets;
		e->next = c->buckets[k];
		c->buckets[k] = e;
		if(++c->count > c->nbuckets) cache_grow(c);
	}
	e->version = version;
	e->fetched_ms = now;
	memset(&e->row, 0, sizeof(e->row));
	memset(&e->limits, 0, sizeof(e->limits));
	memset(&e->bucket, 0, sizeof(e->bucket));
	e->ca_tag = 0;
	e->client = NULL;
	e->current = false;
	mosquitto_free(e->text);
	e->text = NULL;
	return e;
}

static void cache_del(struct cache *c, const char *id)
{
	struct cache_entry **link = &c->buckets[hash_id(id) % c->nbuckets];
	for(; *link; link = &(*link)->next){
		if(!strcmp((*link)->id, id)){
			struct cache_entry *e = *link;
			*link = e->next;
			mosquitto_free(e->text);
			mosquitto_free(e);
			c->count--;
			return;
		}
	}
}

/* Removes the entries for which drop(entry) is true. */
static void cache_sweep(struct cache *c, bool (*drop)(const struct cache_entry *, void *),
		void *arg)
{
	for(size_t i = 0; i < c->nbuckets; i++){
		struct cache_entry **link = &c->buckets[i];
		while(*link){
			struct cache_entry *e = *link;
			if(drop(e, arg)){
				*link = e->next;
				mosquitto_free(e->text);
				mosquitto_free(e);
				c->count--;
			}else{
				link = &e->next;
			}
		}
	}
}

static bool drop_any(const struct cache_entry *e, void *arg)
{
	(void)e;
	(void)arg;
	return true;
}

static void cache_free(struct cache *c)
{
	if(c->buckets == NULL) return;
	for(size_t i = 0; i < c->nbuckets; i++){
		struct cache_entry *e = c->buckets[i], *next;
		for(; e; e = next){
			next = e->next;
			mosquitto_free(e->text);
			mosquitto_free(e);
		}
	}
	mosquitto_free(c->buckets);
	c->buckets = NULL;
}

/* ------------------------------------------------------------------------------------ */
/* Devices to disconnect at the next tick                                               */

static void kick_queue(struct plugin *p, const char *id)
{
	for(size_t i = 0; i < p->nkicks; i++){
		if(!strcmp(p->kicks[i], id)) return;
	}
	if(p->nkicks == p->capkicks){
		size_t cap = p->capkicks ? p->capkicks * 2 : 16;
		char **k = mosquitto_realloc(p->kicks, cap * sizeof(*k));
		if(k == NULL) return;
		p->kicks = k;
		p->capkicks = cap;
	}
	p->kicks[p->nkicks] = mosquitto_strdup(id);
	if(p->kicks[p->nkicks]) p->nkicks++;
}

/* A device that just logged in with current credentials replaces its old connection
 * (same client id): no kick is due any more, and one would disconnect the new session. */
static void kick_forget(struct plugin *p, const char *id)
{
	for(size_t i = 0; i < p->nkicks; i++){
		if(!strcmp(p->kicks[i], id)){
			mosquitto_free(p->kicks[i]);
			p->kicks[i] = p->kicks[--p->nkicks];
			return;
		}
	}
}

/* ------------------------------------------------------------------------------------ */
/* Files                                                                                */

static unsigned char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
	FILE *f = fopen(path, "rb");
	unsigned char *buf;
	size_t n;
	if(f == NULL){
		snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
		return NULL;
	}
	buf = mosquitto_malloc(MAX_SECRET_BYTES + 1);
	if(buf == NULL){
		fclose(f);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	n = fread(buf, 1, MAX_SECRET_BYTES + 1, f);
	if(ferror(f) || n > MAX_SECRET_BYTES){
		snprintf(err, errlen, "cannot read %s (or larger than %d bytes)", path, MAX_SECRET_BYTES);
		fclose(f);
		mosquitto_free(buf);
		return NULL;
	}
	fclose(f);
	*len = n;
	return buf;
}

static void services_free(struct services *s)
{
	for(size_t i = 0; i < s->count; i++){
		mosquitto_free(s->items[i].username);
	}
	mosquitto_free(s->items);
	s->items = NULL;
	s->count = 0;
}

/* Reads "username:<64 hex digits>" lines; # comments and blank lines are skipped. */
static bool services_load(const char *path, struct services *out)
{
	FILE *f = fopen(path, "r");
	char *line = NULL, *start, *colon;
	size_t cap = 0, lineno = 0;
	struct services s = {NULL, 0};
	bool ok = true;

	if(f == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": plugin_opt_services_file: cannot open %s: %s",
				path, strerror(errno));
		return false;
	}
	while(ok && getline(&line, &cap, f) != -1){
		lineno++;
		trim_newline(line);
		start = line;
		while(*start == ' ' || *start == '\t') start++;
		if(*start == '\0' || *start == '#') continue;
		colon = strrchr(start, ':');
		if(colon == NULL || colon == start || strlen(colon + 1) != 2 * SHA256_DIGEST_LENGTH){
			mosquitto_log_printf(MOSQ_LOG_ERR,
					PLUGIN_NAME ": %s line %zu: expected username:<hex sha256 of the password>",
					path, lineno);
			ok = false;
			break;
		}
		struct service svc = {NULL, {0}};
		for(size_t i = 0; i < SHA256_DIGEST_LENGTH; i++){
			int hi = hexval(colon[1 + 2 * i]), lo = hexval(colon[2 + 2 * i]);
			if(hi < 0 || lo < 0){
				mosquitto_log_printf(MOSQ_LOG_ERR,
						PLUGIN_NAME ": %s line %zu: the password hash is not hex", path, lineno);
				ok = false;
				break;
			}
			svc.sha256[i] = (unsigned char)(hi << 4 | lo);
		}
		if(!ok) break;
		*colon = '\0';
		for(size_t i = 0; i < s.count; i++){
			if(!strcmp(s.items[i].username, start)){
				mosquitto_log_printf(MOSQ_LOG_ERR,
						PLUGIN_NAME ": %s line %zu: duplicate username", path, lineno);
				ok = false;
			}
		}
		if(!ok) break;
		struct service *items = mosquitto_realloc(s.items, (s.count + 1) * sizeof(*items));
		svc.username = mosquitto_strdup(start);
		if(items == NULL || svc.username == NULL){
			if(items) s.items = items;
			mosquitto_free(svc.username);
			ok = false;
			break;
		}
		s.items = items;
		s.items[s.count++] = svc;
	}
	free(line);
	fclose(f);
	if(!ok){
		services_free(&s);
		return false;
	}
	*out = s;
	return true;
}

static const struct service *find_service(const struct plugin *p, const char *username)
{
	for(size_t i = 0; i < p->services.count; i++){
		if(!strcmp(p->services.items[i].username, username)) return &p->services.items[i];
	}
	return NULL;
}

/* ------------------------------------------------------------------------------------ */
/* Database                                                                             */

/* 1: ready, 0: deadline passed, -1: error. A deadline already passed checks without
 * waiting. */
static int wait_socket(int fd, short events, int64_t deadline)
{
	struct pollfd pfd;
	int rc;
	if(fd < 0) return -1;
	for(;;){
		int64_t left = deadline - now_ms();
		if(left < 0) left = 0; /* still look once: a non-blocking check */
		pfd.fd = fd;
		pfd.events = events;
		pfd.revents = 0;
		rc = poll(&pfd, 1, (int)left);
		if(rc > 0) return 1;
		if(rc == 0) return 0;
		if(errno != EINTR) return -1;
	}
}

static void copy_pq_error(const char *msg, char *err, size_t errlen)
{
	/* libpq's messages span lines (and indent them): make them one log line */
	size_t n = 0;
	if(msg == NULL || *msg == '\0') msg = "unknown error";
	for(; *msg && n + 1 < errlen; msg++){
		char ch = (*msg == '\n' || *msg == '\t' || *msg == '\r') ? ' ' : *msg;
		if(ch == ' ' && (n == 0 || err[n - 1] == ' ')) continue;
		err[n++] = ch;
	}
	while(n > 0 && err[n - 1] == ' ') n--;
	err[n] = '\0';
}

static void db_drop(struct plugin *p)
{
	if(p->conn){
		PQfinish(p->conn);
		p->conn = NULL;
	}
	p->connecting = false;
}

/* Runs one statement with a deadline. On a connection failure or timeout the connection
 * is dropped (the next db_ready reconnects). NULL on error, with err filled in. */
static PGresult *db_exec(struct plugin *p, const char *sql, int nparams,
		const char *const *params, char *err, size_t errlen)
{
	PGconn *c = p->conn;
	PGresult *result = NULL, *r;
	int64_t deadline = now_ms() + QUERY_TIMEOUT_MS;
	ExecStatusType status;

	p->sqlstate[0] = '\0';
	if(!PQsendQueryParams(c, sql, nparams, NULL, params, NULL, NULL, 0)){
		copy_pq_error(PQerrorMessage(c), err, errlen);
		db_drop(p);
		return NULL;
	}
	for(;;){
		while(PQisBusy(c)){
			int w = wait_socket(PQsocket(c), POLLIN, deadline);
			if(w <= 0){
				snprintf(err, errlen, "no answer within %d ms", QUERY_TIMEOUT_MS);
				PQclear(result);
				db_drop(p);
				return NULL;
			}
			if(!PQconsumeInput(c)){
				copy_pq_error(PQerrorMessage(c), err, errlen);
				PQclear(result);
				db_drop(p);
				return NULL;
			}
		}
		r = PQgetResult(c);
		if(r == NULL) break;
		if(result == NULL){
			result = r;
		}else{
			PQclear(r);
		}
	}
	if(result == NULL){
		copy_pq_error(PQerrorMessage(c), err, errlen);
		if(PQstatus(c) != CONNECTION_OK) db_drop(p);
		return NULL;
	}
	status = PQresultStatus(result);
	if(status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK){
		const char *state = PQresultErrorField(result, PG_DIAG_SQLSTATE);
		copy_pq_error(PQresultErrorMessage(result), err, errlen);
		snprintf(p->sqlstate, sizeof(p->sqlstate), "%s", state ? state : "");
		PQclear(result);
		if(PQstatus(c) != CONNECTION_OK) db_drop(p);
		return NULL;
	}
	return result;
}

static void db_connect_failed(struct plugin *p, const char *err)
{
	db_drop(p);
	p->connecting = false;
	mosquitto_log_printf(MOSQ_LOG_WARNING,
			PLUGIN_NAME ": cannot connect to the database (next attempt in %" PRId64 " ms): %s",
			p->backoff_ms, err);
	p->next_connect_ms = now_ms() + p->backoff_ms;
	p->backoff_ms = p->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : p->backoff_ms * 2;
}

/* Starts connecting (when the backoff allows). Only host name resolution blocks here. */
static void db_start_connect(struct plugin *p)
{
	/* Settings before "dbname" are defaults that the conninfo or URL may override. */
	static const char *const keys[] = {
		"connect_timeout", "tcp_user_timeout", "keepalives", "keepalives_idle",
		"keepalives_interval", "keepalives_count", "fallback_application_name",
		"dbname", NULL,
	};
	const char *values[] = {
		"3", "5000", "1", "30", "10", "3", "mosquitto-" PLUGIN_NAME, p->conninfo, NULL,
	};
	char err[512];
	int64_t now = now_ms();

	if(now < p->next_connect_ms) return;
	p->conn = PQconnectStartParams(keys, values, 1);
	if(p->conn == NULL){
		db_connect_failed(p, "out of memory");
		return;
	}
	if(PQstatus(p->conn) == CONNECTION_BAD){
		copy_pq_error(PQerrorMessage(p->conn), err, sizeof(err));
		db_connect_failed(p, err);
		return;
	}
	p->connecting = true;
	p->connect_status = PGRES_POLLING_WRITING;
	p->connect_deadline_ms = now + CONNECT_TIMEOUT_MS;
}

/* Advances a connection attempt, waiting for the server until wait_until at most (a
 * time already passed: no waiting). true once connected and LISTENing. */
static bool db_advance_connect(struct plugin *p, int64_t wait_until)
{
	char err[512];
	PGresult *res;

	if(wait_until > p->connect_deadline_ms) wait_until = p->connect_deadline_ms;
	while(p->connect_status != PGRES_POLLING_OK){
		int w;
		if(p->connect_status == PGRES_POLLING_FAILED){
			copy_pq_error(PQerrorMessage(p->conn), err, sizeof(err));
			db_connect_failed(p, err);
			return false;
		}
		w = wait_socket(PQsocket(p->conn),
				p->connect_status == PGRES_POLLING_READING ? POLLIN : POLLOUT, wait_until);
		if(w < 0){
			snprintf(err, sizeof(err), "poll: %s", strerror(errno));
			db_connect_failed(p, err);
			return false;
		}
		if(w == 0){
			if(now_ms() >= p->connect_deadline_ms){
				snprintf(err, sizeof(err), "no connection within %d ms", CONNECT_TIMEOUT_MS);
				db_connect_failed(p, err);
			}
			return false; /* still connecting: the next tick goes on */
		}
		p->connect_status = PQconnectPoll(p->conn);
	}
	p->connecting = false;
	static const char *const listens[] = {
		"LISTEN " NOTIFY_CHANNEL, "LISTEN " CAS_CHANNEL, "LISTEN " LIMITS_CHANNEL,
		"LISTEN " PARENT_CHANNEL,
	};
	for(size_t i = 0; i < sizeof(listens) / sizeof(*listens); i++){
		res = db_exec(p, listens[i], 0, NULL, err, sizeof(err));
		if(res == NULL){
			db_connect_failed(p, err);
			return false;
		}
		PQclear(res);
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, PLUGIN_NAME ": connected to the database");
	p->backoff_ms = BACKOFF_MIN_MS;
	p->next_connect_ms = 0;
	/* Notifications sent while there was no connection are lost: the next ticks check
	 * the connected devices against the registry, and no cached credentials are fresh. */
	p->reconnected = true;
	p->connection_epoch++; /* the children's parents are read again */
	p->cas_stale = true;
	p->limits_stale = true;
	for(size_t i = 0; i < p->cache.nbuckets; i++){
		for(struct cache_entry *e = p->cache.buckets[i]; e; e = e->next){
			if(e->fetched_ms > now_ms() - p->cache_ms) e->fetched_ms = now_ms() - p->cache_ms;
		}
	}
	return true;
}

/* Whether there is a working, LISTENing connection, starting or advancing a connection
 * attempt when there is none. Connecting never blocks the broker for long: the server
 * is waited for max_wait_ms at most (0 from the tick; a login in need of credentials
 * waits a little), and an attempt that takes longer goes on at the next ticks until its
 * deadline (CONNECT_TIMEOUT_MS). */
static bool db_ready(struct plugin *p, int64_t max_wait_ms)
{
	if(p->conn && !p->connecting){
		if(PQstatus(p->conn) == CONNECTION_OK) return true;
		db_drop(p); /* broken: reconnect at once, backoff applies to failed attempts */
	}
	if(p->conn == NULL){
		db_start_connect(p);
		if(p->conn == NULL) return false;
	}
	return db_advance_connect(p, now_ms() + max_wait_ms);
}

/* Reads pending notifications: each names a device whose key changed or which was
 * deleted. Its cache entry goes now; its connection at the next tick. */
static void forget_child(struct plugin *p, const char *id);

static void db_drain(struct plugin *p)
{
	PGnotify *n;
	char err[512];
	if(p->conn == NULL || p->connecting) return;
	if(!PQconsumeInput(p->conn)){
		copy_pq_error(PQerrorMessage(p->conn), err, sizeof(err));
		mosquitto_log_printf(MOSQ_LOG_WARNING, PLUGIN_NAME ": database connection lost: %s", err);
		db_drop(p);
		return;
	}
	while((n = PQnotifies(p->conn)) != NULL){
		if(!strcmp(n->relname, NOTIFY_CHANNEL) && n->extra && n->extra[0]){
			cache_del(&p->cache, n->extra);
			forget_child(p, n->extra);
			kick_queue(p, n->extra);
		}else if(!strcmp(n->relname, PARENT_CHANNEL) && n->extra && n->extra[0]){
			forget_child(p, n->extra); /* moved: nothing to disconnect */
		}else if(!strcmp(n->relname, CAS_CHANNEL)){
			p->cas_stale = true;
		}else if(!strcmp(n->relname, LIMITS_CHANNEL)){
			p->limits_stale = true;
			/* Cached credentials carry limits: read again at the next login (kept for
			 * stale-if-error). */
			for(size_t i = 0; i < p->cache.nbuckets; i++){
				for(struct cache_entry *e = p->cache.buckets[i]; e; e = e->next){
					if(e->fetched_ms > now_ms() - p->cache_ms) e->fetched_ms = now_ms() - p->cache_ms;
				}
			}
		}
		PQfreemem(n);
	}
}

/* A text[] literal of ids: {"id1","id2"}, with " and \ escaped (NULL: no memory). */
static char *text_array(char *const *ids, size_t n)
{
	char *literal, *w;
	size_t size = 3;

	for(size_t i = 0; i < n; i++) size += 2 * strlen(ids[i]) + 3;
	literal = w = mosquitto_malloc(size);
	if(literal == NULL) return NULL;
	*w++ = '{';
	for(size_t i = 0; i < n; i++){
		if(i > 0) *w++ = ',';
		*w++ = '"';
		for(const char *c = ids[i]; *c; c++){
			if(*c == '"' || *c == '\\') *w++ = '\\';
			*w++ = *c;
		}
		*w++ = '"';
	}
	*w++ = '}';
	*w = '\0';
	return literal;
}

/* SELECT id, credentials_version for the given ids (one round trip). NULL on error. */
static PGresult *db_versions(struct plugin *p, char *const *ids, size_t n, char *err,
		size_t errlen)
{
	const char *params[1];
	char *literal = text_array(ids, n);
	PGresult *res;

	if(literal == NULL){
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	params[0] = literal;
	res = db_exec(p, "SELECT id, credentials_version FROM devices WHERE id = ANY($1::text[])",
			1, params, err, errlen);
	mosquitto_free(literal);
	return res;
}

/* Disconnects those of the given devices that are connected under a credentials_version
 * which is no longer the registry's (or which are no longer registered). false when the
 * registry could not be read; then, if kick_on_error, they are all disconnected. */
static bool check_sessions(struct plugin *p, char *const *ids, size_t n, bool kick_on_error)
{
	char **connected, **stale, shown[LOG_FIELD_MAX], err[512];
	size_t nconnected = 0, nstale = 0;
	PGresult *res = NULL;
	bool ok = true;

	if(n == 0) return true;
	connected = mosquitto_malloc(n * sizeof(*connected));
	stale = mosquitto_malloc(n * sizeof(*stale));
	if(connected == NULL || stale == NULL){
		mosquitto_free(connected);
		mosquitto_free(stale);
		return false;
	}
	for(size_t i = 0; i < n; i++){
		if(cache_find(&p->sessions, ids[i])) connected[nconnected++] = ids[i];
	}
	if(nconnected > 0){
		if(db_ready(p, 0)){
			res = db_versions(p, connected, nconnected, err, sizeof(err));
		}else{
			snprintf(err, sizeof(err), "no database connection");
		}
		if(res == NULL){
			mosquitto_log_printf(MOSQ_LOG_WARNING,
					PLUGIN_NAME ": cannot read the credentials of connected devices: %s", err);
			ok = false;
		}
	}
	for(size_t i = 0; i < nconnected; i++){
		cache_find(&p->sessions, connected[i])->current = false; /* found just above */
	}
	for(int row = 0; res && row < PQntuples(res); row++){
		struct cache_entry *e = cache_find(&p->sessions, PQgetvalue(res, row, 0));
		if(e && e->version == atoi(PQgetvalue(res, row, 1))) e->current = true;
	}
	for(size_t i = 0; i < nconnected; i++){
		const struct cache_entry *e = cache_find(&p->sessions, connected[i]);
		if(e && (res ? !e->current : kick_on_error)) stale[nstale++] = connected[i];
	}
	PQclear(res);
	/* Kicking calls on_disconnect, which removes the session entry. */
	for(size_t i = 0; i < nstale; i++){
		if(mosquitto_kick_client_by_clientid(stale[i], false) == MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					PLUGIN_NAME ": disconnected device '%s': its credentials changed",
					printable(stale[i], shown, sizeof(shown)));
		}
	}
	mosquitto_free(connected);
	mosquitto_free(stale);
	return ok;
}

/* The devices named by notifications: those connected with an outdated key go. A device
 * that logged in again with its new key keeps its new session (the notification merely
 * arrived after that login). */
static void kick_run(struct plugin *p)
{
	check_sessions(p, p->kicks, p->nkicks, true);
	for(size_t i = 0; i < p->nkicks; i++) mosquitto_free(p->kicks[i]);
	p->nkicks = 0;
}

static void round_free(struct id_round *r)
{
	for(size_t i = 0; i < r->n; i++) mosquitto_free(r->ids[i]);
	mosquitto_free(r->ids);
	r->ids = NULL;
	r->n = r->done = 0;
}

/* A new round over the devices connected now (false: no memory). */
static bool round_start(struct id_round *r, const struct cache *sessions)
{
	round_free(r);
	r->ids = mosquitto_malloc((sessions->count + 1) * sizeof(*r->ids));
	if(r->ids == NULL) return false;
	for(size_t i = 0; i < sessions->nbuckets; i++){
		for(struct cache_entry *e = sessions->buckets[i]; e; e = e->next){
			if((r->ids[r->n] = mosquitto_strdup(e->id)) != NULL) r->n++;
		}
	}
	return true;
}

/* The next batch's size (its ids from r->ids + r->done); 0 ends the round. */
static size_t round_batch(struct id_round *r)
{
	size_t left = r->n - r->done;
	if(left == 0) round_free(r);
	return left > REVALIDATE_BATCH ? REVALIDATE_BATCH : left;
}

/* After a reconnection, a batch per tick: the connected devices whose key changed while
 * the notifications could not arrive are disconnected. */
static void recheck_step(struct plugin *p)
{
	size_t batch;
	if(p->reconnected){
		p->reconnected = false;
		if(!round_start(&p->recheck, &p->sessions)) return;
	}
	batch = round_batch(&p->recheck);
	if(batch == 0) return;
	/* On an error the connection is gone: its next reconnection starts over. */
	if(check_sessions(p, p->recheck.ids + p->recheck.done, batch, false)){
		p->recheck.done += batch;
	}else{
		round_free(&p->recheck);
	}
}

/* Hex of 32 bytes into out; false when it is not that. */
static bool unhex32(const char *hex, unsigned char out[SHA256_DIGEST_LENGTH])
{
	if(strlen(hex) != 2 * SHA256_DIGEST_LENGTH) return false;
	for(int i = 0; i < SHA256_DIGEST_LENGTH; i++){
		int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
		if(hi < 0 || lo < 0) return false;
		out[i] = (unsigned char)(hi * 16 + lo);
	}
	return true;
}

/* messages_per_second, burst_messages, bytes_per_second, burst_bytes from column col of
 * a row (NULL: no limits). */
static void read_limits(PGresult *res, int row, int col, struct limits *out)
{
	memset(out, 0, sizeof(*out));
	if(PQgetisnull(res, row, col)) return;
	out->messages_per_s = atof(PQgetvalue(res, row, col));
	out->burst_messages = atof(PQgetvalue(res, row, col + 1));
	out->bytes_per_s = atof(PQgetvalue(res, row, col + 2));
	out->burst_bytes = atof(PQgetvalue(res, row, col + 3));
}

/* A row of DEVICE_QUERY. */
static void parse_device_row(PGresult *res, struct device_row *row)
{
	memset(row, 0, sizeof(*row));
	if(PQntuples(res) == 0) return;
	row->known = true;
	row->key_version = atoi(PQgetvalue(res, 0, 0));
	row->credentials = atoi(PQgetvalue(res, 0, 1));
	row->enabled = !strcmp(PQgetvalue(res, 0, 2), "t");
	row->auth = !strcmp(PQgetvalue(res, 0, 3), "x509_self_signed") ? AUTH_SELF_SIGNED
		: !strcmp(PQgetvalue(res, 0, 3), "x509_ca") ? AUTH_CA : AUTH_KEY;
	for(int col = 4; col < 6; col++){
		if(!PQgetisnull(res, 0, col)
				&& unhex32(PQgetvalue(res, 0, col), row->thumbs[row->nthumbs])){
			row->nthumbs++;
		}
	}
	snprintf(row->ca, sizeof(row->ca), "%s", PQgetvalue(res, 0, 10));
	row->gateway = !strcmp(PQgetvalue(res, 0, 11), "t");
	read_limits(res, 0, 6, &row->limits);
}

#define DEVICE_QUERY \
	"SELECT d.key_version, d.credentials_version, d.enabled, d.auth, " \
	"encode(d.primary_thumbprint, 'hex'), encode(d.secondary_thumbprint, 'hex'), " \
	"l.messages_per_second, l.burst_messages, l.bytes_per_second, l.burst_bytes, " \
	"coalesce(d.ca_name, ''), d.gateway IS NOT NULL " \
	"FROM devices d LEFT JOIN LATERAL fleetline_limits_of(d.id, d.tags) l ON true " \
	"WHERE d.id = $1"

/* The device's credentials (row->known false if absent): from the cache while fresh
 * (*cached set), else from the database, else from a stale cache entry. */
static enum lookup_result lookup_device(struct plugin *p, const char *id,
		struct device_row *row, const char *shown_id, bool *cached)
{
	struct cache_entry *e;
	int64_t now = now_ms();
	const char *params[1] = {id};
	char err[512] = "no database connection";
	PGresult *res = NULL;
	bool tried = false;

	db_drain(p);
	e = cache_find(&p->cache, id);
	*cached = e && now - e->fetched_ms < p->cache_ms;
	if(*cached){
		*row = e->row;
		return LOOKUP_OK;
	}
	/* Two attempts: a connection broken since its last use fails on the first. */
	for(int attempt = 0; attempt < 2 && res == NULL; attempt++){
		if(!db_ready(p, LOGIN_CONNECT_WAIT_MS)) break;
		tried = true;
		res = db_exec(p, DEVICE_QUERY, 1, params, err, sizeof(err));
	}
	if(res != NULL){
		parse_device_row(res, row);
		PQclear(res);
		e = cache_put(&p->cache, id, 0, now);
		if(e) e->row = *row;
		return LOOKUP_OK;
	}
	e = cache_find(&p->cache, id);
	if(e && e->row.known && now - e->fetched_ms < p->stale_ms){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": database unavailable (%s); using the credentials of '%s' cached "
				"%" PRId64 " s ago", err, shown_id, (now - e->fetched_ms) / 1000);
		*row = e->row;
		return LOOKUP_OK;
	}
	if(tried){ /* else the connection attempt logged its failure */
		mosquitto_log_printf(MOSQ_LOG_WARNING, PLUGIN_NAME ": credentials query failed: %s", err);
	}
	return LOOKUP_DB_ERROR;
}

/* ------------------------------------------------------------------------------------ */
/* Verified CAs                                                                         */

static void cas_free(struct ca *cas, size_t n)
{
	for(size_t i = 0; i < n; i++) X509_free(cas[i].cert);
	mosquitto_free(cas);
}

static X509 *parse_pem(const char *pem)
{
	BIO *bio = BIO_new_mem_buf(pem, -1);
	X509 *cert = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
	BIO_free(bio);
	return cert;
}

static uint64_t cert_tag(X509 *cert)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int n = 0;
	uint64_t tag = 0;
	if(!X509_digest(cert, EVP_sha256(), md, &n) || n < 8) return 1;
	for(int i = 0; i < 8; i++) tag = (tag << 8) | md[i];
	return tag ? tag : 1;
}

/* Disconnects the devices that logged in through a CA no longer verified. */
static void kick_orphans_of_cas(struct plugin *p)
{
	char **gone = NULL, shown[LOG_FIELD_MAX];
	size_t n = 0;
	if(p->sessions.count == 0) return;
	gone = mosquitto_malloc(p->sessions.count * sizeof(*gone));
	if(gone == NULL) return;
	for(size_t i = 0; i < p->sessions.nbuckets; i++){
		for(struct cache_entry *e = p->sessions.buckets[i]; e; e = e->next){
			bool found = e->ca_tag == 0;
			for(size_t k = 0; k < p->ncas && !found; k++) found = p->cas[k].tag == e->ca_tag;
			if(!found && (gone[n] = mosquitto_strdup(e->id)) != NULL) n++;
		}
	}
	/* Kicking calls on_disconnect, which removes session entries: not while walking. */
	for(size_t i = 0; i < n; i++){
		if(mosquitto_kick_client_by_clientid(gone[i], false) == MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					PLUGIN_NAME ": disconnected device '%s': the CA of its certificate was removed",
					printable(gone[i], shown, sizeof(shown)));
		}
		mosquitto_free(gone[i]);
	}
	mosquitto_free(gone);
}

/* Reads the verified CAs (when stale and the database answers). */
static void load_cas(struct plugin *p)
{
	char err[512];
	PGresult *res;
	struct ca *cas;
	size_t n = 0;

	if(!p->cas_stale || !db_ready(p, 0)) return;
	res = db_exec(p, "SELECT name, certificate FROM x509_cas WHERE verified_at IS NOT NULL "
			"ORDER BY name", 0, NULL, err, sizeof(err));
	if(res == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING, PLUGIN_NAME ": cannot read the CAs: %s", err);
		return;
	}
	cas = mosquitto_calloc((size_t)PQntuples(res) + 1, sizeof(*cas));
	if(cas == NULL){
		PQclear(res);
		return;
	}
	for(int row = 0; row < PQntuples(res); row++){
		X509 *cert = parse_pem(PQgetvalue(res, row, 1));
		if(cert == NULL){
			mosquitto_log_printf(MOSQ_LOG_WARNING, PLUGIN_NAME ": CA '%s' is not a PEM certificate",
					PQgetvalue(res, row, 0));
			continue;
		}
		cas[n].cert = cert;
		cas[n].tag = cert_tag(cert);
		snprintf(cas[n].name, sizeof(cas[n].name), "%s", PQgetvalue(res, row, 0));
		n++;
	}
	PQclear(res);
	cas_free(p->cas, p->ncas);
	p->cas = cas;
	p->ncas = n;
	p->cas_stale = false;
	kick_orphans_of_cas(p);
}

/* Whether cert is within its validity period now. */
static bool valid_now(X509 *cert)
{
	return X509_cmp_current_time(X509_get0_notBefore(cert)) < 0
		&& X509_cmp_current_time(X509_get0_notAfter(cert)) > 0;
}

/* Whether ca (valid now) signed cert. */
static bool signed_by(X509 *cert, X509 *ca)
{
	EVP_PKEY *key = X509_get0_pubkey(ca);
	return X509_NAME_cmp(X509_get_issuer_name(cert), X509_get_subject_name(ca)) == 0
		&& key != NULL && X509_verify(cert, key) == 1 && valid_now(ca);
}

/* The verified CA of that name (NULL: none). */
static const struct ca *verified_ca(const struct plugin *p, const char *name)
{
	for(size_t i = 0; i < p->ncas; i++){
		if(!strcmp(p->cas[i].name, name)) return &p->cas[i];
	}
	return NULL;
}

/* ------------------------------------------------------------------------------------ */
/* Client certificates on TLS listeners                                                 */

/* The TLS layer's check of a client certificate: everything but trust. A certificate
 * that chains to nothing the listener knows passes here; the login decides (thumbprint,
 * or a verified CA) from the registry. Expired, not yet valid and malformed certificates
 * fail the handshake, with the reason logged. */
static int verify_client_certificate(int ok, X509_STORE_CTX *ctx)
{
	int err = X509_STORE_CTX_get_error(ctx);
	X509 *cert;
	char subject[LOG_FIELD_MAX] = "?", shown[LOG_FIELD_MAX];

	if(ok) return 1;
	switch(err){
	case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
	case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
	case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
	case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
	case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
	case X509_V_ERR_CERT_UNTRUSTED:
		return 1;
	default:
		break;
	}
	cert = X509_STORE_CTX_get_current_cert(ctx);
	if(cert) X509_NAME_oneline(X509_get_subject_name(cert), subject, sizeof(subject));
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			PLUGIN_NAME ": refused a client certificate (subject %s): %s",
			printable(subject, shown, sizeof(shown)), X509_verify_cert_error_string(err));
	return 0;
}

/* Called by OpenSSL for every new SSL object of the broker: the server side of a
 * listener that does not require certificates asks for one (optional) and checks it with
 * verify_client_certificate. */
static void on_ssl_new(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
		void *argp)
{
	SSL *ssl = parent;
	SSL_CTX *ctx = ssl ? SSL_get_SSL_CTX(ssl) : NULL;
	int mode;
	(void)ptr;
	(void)ad;
	(void)idx;
	(void)argl;
	(void)argp;
	if(ctx == NULL || !SSL_is_server(ssl)) return;
	/* A listener that requires certificates keeps its own trust (its cafile/capath):
	 * with use_identity_as_username Mosquitto takes the certificate's name without asking
	 * the plugin, so only that listener's CA may vouch for it. */
	mode = SSL_CTX_get_verify_mode(ctx);
	if(mode != SSL_VERIFY_NONE) return;
	SSL_set_verify(ssl, SSL_VERIFY_PEER, verify_client_certificate);
}

/* The common name of cert into out ("" when it has none). */
/* The (first) common name of cert into out; "" when it has none, or one that does not
 * fit or holds a NUL (which would cut it short). */
static void common_name(X509 *cert, char *out, size_t outlen)
{
	X509_NAME *name = X509_get_subject_name(cert);
	int at = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
	const ASN1_STRING *data;
	int len;

	out[0] = '\0';
	if(at < 0) return;
	data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, at));
	len = data ? ASN1_STRING_length(data) : -1;
	if(len <= 0 || (size_t)len >= outlen || memchr(ASN1_STRING_get0_data(data), 0, (size_t)len)){
		return;
	}
	memcpy(out, ASN1_STRING_get0_data(data), (size_t)len);
	out[len] = '\0';
}

static bool thumbprint(X509 *cert, unsigned char out[SHA256_DIGEST_LENGTH])
{
	unsigned int n = 0;
	return X509_digest(cert, EVP_sha256(), out, &n) && n == SHA256_DIGEST_LENGTH;
}

/* NULL when cert is the device's (*ca_tag: the CA that signed it, for x509_ca); else
 * the reason. */
static const char *check_device_certificate(struct plugin *p, const char *id,
		const struct device_row *row, X509 *cert, uint64_t *ca_tag)
{
	unsigned char digest[SHA256_DIGEST_LENGTH];
	char cn[DEVICE_ID_MAX + 2];
	const struct ca *ca;

	if(cert == NULL) return "no client certificate (the device authenticates with one)";
	if(!valid_now(cert)) return "certificate outside its validity period";
	if(row->auth == AUTH_SELF_SIGNED){
		if(!thumbprint(cert, digest)) return "internal error (digest)";
		for(int i = 0; i < row->nthumbs; i++){
			if(CRYPTO_memcmp(digest, row->thumbs[i], sizeof(digest)) == 0) return NULL;
		}
		return "certificate thumbprint not registered for the device";
	}
	common_name(cert, cn, sizeof(cn));
	if(strcmp(cn, id) != 0) return "certificate common name is not the device id";
	load_cas(p);
	ca = verified_ca(p, row->ca);
	if(ca == NULL) return "the device's CA is not (or no longer) verified";
	if(!signed_by(cert, ca->cert)) return "certificate not signed by the device's CA";
	*ca_tag = ca->tag;
	return NULL;
}

/* ------------------------------------------------------------------------------------ */
/* Credentials                                                                          */

static bool hmac_sha256(const void *key, size_t keylen, const char *msg,
		unsigned char out[KEY_BYTES])
{
	unsigned int outlen = 0;
	return HMAC(EVP_sha256(), key, (int)keylen, (const unsigned char *)msg, strlen(msg), out,
			&outlen) != NULL && outlen == KEY_BYTES;
}

static bool equal_ct(const char *a, size_t alen, const char *b, size_t blen)
{
	return alen == blen && CRYPTO_memcmp(a, b, alen) == 0;
}

/* NULL when the password is key (base64 of it) or a live SAS token that key signed for
 * id; else the reason. The key is wiped. */
static const char *check_password_with_key(const struct plugin *p, unsigned char key[KEY_BYTES],
		const char *id, const char *password)
{
	unsigned char mac[KEY_BYTES];
	char msg[DEVICE_ID_MAX + 32], b64[B64_KEY_LEN + 1];
	const char *sig, *sep, *digits;
	long long expiry = 0;
	size_t ndigits = 0;
	const char *reason = NULL;

	if(password == NULL){
		reason = "bad key (no password)";
		goto out;
	}
	if(strncmp(password, "sig=", 4) != 0){
		EVP_EncodeBlock((unsigned char *)b64, key, KEY_BYTES);
		reason = equal_ct(password, strlen(password), b64, B64_KEY_LEN) ? NULL : "bad key";
		goto out;
	}
	/* sig=<base64>&se=<expiry>: as devicekeys.verify_password, the first "&se=" splits */
	sig = password + 4;
	sep = strstr(sig, "&se=");
	if(sep == NULL){
		reason = "bad token (no se=)";
		goto out;
	}
	/* se: ASCII digits; int() in Python also ignores leading zeros (and would take
	 * other Unicode digits, or more than 18 digits, which no issued token has) */
	digits = sep + 4;
	while(*digits == '0' && digits[1]) digits++;
	for(const char *d = digits; *d; d++){
		if(*d < '0' || *d > '9'){
			reason = "bad token (se is not a number)";
			goto out;
		}
		ndigits++;
	}
	if(ndigits == 0 || ndigits > 18){
		reason = "bad token (se is not a number)";
		goto out;
	}
	expiry = strtoll(digits, NULL, 10);
	if(expiry <= (long long)time(NULL)){
		reason = "expired token";
		goto out;
	}
	if(expiry - (long long)time(NULL) > p->max_token_s + TOKEN_CLOCK_SLACK_SECONDS){
		reason = "token valid longer than the maximum (plugin_opt_max_token_seconds)";
		goto out;
	}
	snprintf(msg, sizeof(msg), "%s\n%lld", id, expiry);
	if(!hmac_sha256(key, KEY_BYTES, msg, mac)){
		reason = "internal error (HMAC)";
		goto out;
	}
	EVP_EncodeBlock((unsigned char *)b64, mac, KEY_BYTES);
	reason = equal_ct(sig, (size_t)(sep - sig), b64, B64_KEY_LEN) ? NULL : "bad token signature";
out:
	OPENSSL_cleanse(key, KEY_BYTES);
	OPENSSL_cleanse(b64, sizeof(b64));
	return reason;
}

/* NULL when the password is valid for the device's key; else the reason. */
static const char *check_device_password(const struct plugin *p, const char *id, int version,
		const char *password)
{
	unsigned char key[KEY_BYTES];
	char msg[DEVICE_ID_MAX + 32];
	snprintf(msg, sizeof(msg), "%s\n%d", id, version);
	if(!hmac_sha256(p->secret, p->secret_len, msg, key)) return "internal error (HMAC)";
	return check_password_with_key(p, key, id, password);
}

static int refuse(struct mosquitto *client, const char *username, const char *reason)
{
	char shown_user[LOG_FIELD_MAX], shown_id[LOG_FIELD_MAX];
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			PLUGIN_NAME ": refused login of username '%s' (client id '%s', %s): %s",
			printable(username, shown_user, sizeof(shown_user)),
			printable(mosquitto_client_id(client), shown_id, sizeof(shown_id)),
			mosquitto_client_address(client) ? mosquitto_client_address(client) : "?", reason);
	return MOSQ_ERR_AUTH;
}

static bool drop_old_failure(const struct cache_entry *e, void *arg);

/* The failure-tracking key of a client id and address ("pair:<address>/<client id>"). */
static void failure_key(char *out, size_t outlen, const char *kind, const char *value)
{
	snprintf(out, outlen, "%s:%s", kind, value ? value : "");
}

static int64_t throttle_ms(int failures, int free_failures)
{
	int64_t ms = THROTTLE_MIN_MS;
	if(failures <= free_failures) return 0;
	for(int i = free_failures + 1; i < failures && ms < THROTTLE_MAX_MS; i++) ms *= 2;
	return ms < THROTTLE_MAX_MS ? ms : THROTTLE_MAX_MS;
}

/* Milliseconds until the key may try again (0: now). */
static int64_t throttled_for(struct plugin *p, const char *key, int free_failures, int64_t now)
{
	const struct cache_entry *e = cache_find(&p->failures, key);
	int64_t until;
	if(e == NULL) return 0;
	until = e->fetched_ms + throttle_ms(e->version, free_failures);
	return until > now ? until - now : 0;
}

static void record_failure(struct plugin *p, const char *key, int free_failures, int64_t now)
{
	struct cache_entry *e = cache_find(&p->failures, key);
	char shown[LOG_FIELD_MAX];
	int failures = e ? e->version + 1 : 1;
	if(e != NULL && now - e->fetched_ms >= FAILURES_FORGET_MS) failures = 1; /* forgotten */
	if(e == NULL && p->failures.count >= FAILURES_MAX_TRACKED){
		cache_sweep(&p->failures, drop_old_failure, &now); /* room from the forgotten */
		if(p->failures.count >= FAILURES_MAX_TRACKED) return;
	}
	e = cache_put(&p->failures, key, failures, now);
	if(e != NULL && failures > free_failures){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": %d failed logins of %s: its next attempt waits %" PRId64 " ms",
				failures, printable(key, shown, sizeof(shown)), throttle_ms(failures, free_failures));
	}
}

/* What a device logged in under. */
struct login {
	bool gateway;
	int credentials; /* its credentials_version */
	uint64_t ca_tag; /* the CA that signed its certificate (0: none) */
	struct limits limits;
};

/* The device's credentials check: its key or token, or its client certificate. */
static const char *check_device(struct plugin *p, struct mosquitto *client, const char *id,
		const char *password, const struct device_row *row, struct login *login)
{
	X509 *cert;
	const char *reason;

	if(!row->known) return "unknown device";
	if(!row->enabled) return "device disabled";
	login->credentials = row->credentials;
	login->limits = row->limits;
	login->gateway = row->gateway;
	if(row->auth == AUTH_KEY){
		if(password == NULL) return "bad key (no password)";
		if(row->key_version <= 0) return "no key issued";
		return check_device_password(p, id, row->key_version, password);
	}
	cert = mosquitto_client_certificate(client);
	reason = check_device_certificate(p, id, row, cert, &login->ca_tag);
	X509_free(cert);
	return reason;
}

#define ENROLLMENT_QUERY \
	"SELECT e.kind, e.attestation, e.key_version, e.enabled, encode(e.thumbprint, 'hex'), " \
	"c.certificate, $2 ~ ('^(?:' || e.registration_pattern || ')$') " \
	"FROM enrollments e LEFT JOIN x509_cas c " \
	"ON c.name = e.ca_name AND c.verified_at IS NOT NULL WHERE e.id = $1"

/* The enrollment credential of a device that provisions itself: a key (a group's:
 * HMAC-SHA256(enrollment key, registration id); an individual one's: the enrollment
 * key) or SAS token, or a client certificate (a group's: signed by its verified CA, the
 * registration id as common name; an individual one's: the registered thumbprint). */
static const char *check_enrollment(struct plugin *p, PGresult *res, const char *enrollment,
		const char *registration, const char *password, X509 *cert)
{
	bool group = !strcmp(PQgetvalue(res, 0, 0), "group");
	unsigned char key[KEY_BYTES], digest[SHA256_DIGEST_LENGTH], want[SHA256_DIGEST_LENGTH];
	char msg[DEVICE_ID_MAX + 48], cn[DEVICE_ID_MAX + 2];

	if(strcmp(PQgetvalue(res, 0, 3), "t") != 0) return "enrollment disabled";
	if(!group && strcmp(registration, enrollment) != 0){
		return "an individual enrollment registers only its own id";
	}
	if(strcmp(PQgetvalue(res, 0, 6), "t") != 0){
		return "registration id outside the enrollment's pattern";
	}
	if(!strcmp(PQgetvalue(res, 0, 1), "symmetric_key")){
		snprintf(msg, sizeof(msg), "enrollment\n%s\n%s", enrollment, PQgetvalue(res, 0, 2));
		if(!hmac_sha256(p->secret, p->secret_len, msg, key)) return "internal error (HMAC)";
		if(group){
			unsigned char derived[KEY_BYTES];
			unsigned int outlen = 0;
			bool ok = HMAC(EVP_sha256(), key, KEY_BYTES, (const unsigned char *)registration,
					strlen(registration), derived, &outlen) != NULL && outlen == KEY_BYTES;
			memcpy(key, derived, KEY_BYTES);
			OPENSSL_cleanse(derived, sizeof(derived));
			if(!ok){
				OPENSSL_cleanse(key, sizeof(key));
				return "internal error (HMAC)";
			}
		}
		return check_password_with_key(p, key, registration, password);
	}
	if(cert == NULL) return "no client certificate (the enrollment attests with X.509)";
	if(!valid_now(cert)) return "certificate outside its validity period";
	if(!group){
		if(PQgetisnull(res, 0, 4) || !unhex32(PQgetvalue(res, 0, 4), want)
				|| !thumbprint(cert, digest)
				|| CRYPTO_memcmp(digest, want, sizeof(digest)) != 0){
			return "certificate thumbprint not the enrollment's";
		}
		return NULL;
	}
	common_name(cert, cn, sizeof(cn));
	if(strcmp(cn, registration) != 0) return "certificate common name is not the registration id";
	if(PQgetisnull(res, 0, 5)) return "the enrollment's CA is not verified";
	{
		X509 *ca = parse_pem(PQgetvalue(res, 0, 5));
		bool ok = ca != NULL && signed_by(cert, ca);
		X509_free(ca);
		if(!ok) return "certificate not signed by the enrollment's CA";
	}
	return NULL;
}

/* A provisioning login: user name = client id = PROVISION_PREFIX "{enrollment id}/
 * {registration id}". Never a device's client id (those hold no '$' or '/'), so it can
 * neither take over a device's session nor be taken for one. */
static const char *check_provisioning(struct plugin *p, struct mosquitto *client,
		const char *username, const char *password, bool *counts)
{
	const char *client_id = mosquitto_client_id(client);
	const char *identity = username + sizeof(PROVISION_PREFIX) - 1;
	const char *slash = strchr(identity, '/');
	char enrollment[DEVICE_ID_MAX + 1];
	const char *registration, *params[2];
	char err[512] = "no database connection";
	PGresult *res = NULL;
	const char *reason;
	X509 *cert;

	if(client_id == NULL || strcmp(client_id, username) != 0){
		return "client id mismatch (must equal the user name)";
	}
	if(slash == NULL || (size_t)(slash - identity) > DEVICE_ID_MAX){
		return "user name is not $provision/<enrollment>/<registration id>";
	}
	memcpy(enrollment, identity, (size_t)(slash - identity));
	enrollment[slash - identity] = '\0';
	registration = slash + 1;
	if(!valid_device_id(enrollment)) return "unknown enrollment";
	if(!valid_device_id(registration)) return "invalid registration id";
	params[0] = enrollment;
	params[1] = registration;
	for(int attempt = 0; attempt < 2 && res == NULL; attempt++){
		if(!db_ready(p, LOGIN_CONNECT_WAIT_MS)) break;
		res = db_exec(p, ENROLLMENT_QUERY, 2, params, err, sizeof(err));
	}
	if(res == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING, PLUGIN_NAME ": enrollment query failed: %s", err);
		*counts = false;
		return "database unavailable";
	}
	if(PQntuples(res) == 0){
		PQclear(res);
		return "unknown enrollment";
	}
	cert = mosquitto_client_certificate(client);
	reason = check_enrollment(p, res, enrollment, registration, password, cert);
	X509_free(cert);
	PQclear(res);
	return reason;
}

static bool provisioning_login(const char *username)
{
	return username != NULL && !strncmp(username, PROVISION_PREFIX, sizeof(PROVISION_PREFIX) - 1);
}

/* NULL when the login is valid (a device's in *login); else the reason. *counts: whether
 * it is a failure to throttle (not when the database could not be asked). */
static const char *check_login(struct plugin *p, struct mosquitto *client, const char *username,
		const char *password, bool *counts, struct login *login)
{
	const struct service *svc;
	const char *client_id;
	char shown[LOG_FIELD_MAX];
	struct device_row row;
	bool cached;
	const char *reason;

	*counts = true;
	memset(login, 0, sizeof(*login));
	if(username == NULL) return "anonymous login";
	svc = find_service(p, username);
	if(svc != NULL){
		unsigned char digest[SHA256_DIGEST_LENGTH];
		if(password == NULL) return "service without password";
		SHA256((const unsigned char *)password, strlen(password), digest);
		return CRYPTO_memcmp(digest, svc->sha256, sizeof(digest)) == 0
			? NULL : "bad service password";
	}
	if(provisioning_login(username)) return check_provisioning(p, client, username, password, counts);
	client_id = mosquitto_client_id(client);
	if(client_id == NULL || strcmp(client_id, username) != 0){
		return "client id mismatch (must equal the device id)";
	}
	if(!valid_device_id(username)) return "unknown device";
	printable(username, shown, sizeof(shown));
	if(lookup_device(p, username, &row, shown, &cached) != LOOKUP_OK){
		*counts = false;
		return "database unavailable";
	}
	reason = check_device(p, client, username, password, &row, login);
	/* Refused on cached credentials: they may have just changed (a new key or
	 * certificate whose notification is on its way), so ask the registry once. */
	if(reason != NULL && cached){
		cache_del(&p->cache, username);
		if(lookup_device(p, username, &row, shown, &cached) == LOOKUP_OK){
			reason = check_device(p, client, username, password, &row, login);
		}
	}
	return reason;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct plugin *p = userdata;
	const char *username = ed->username, *reason;
	const char *address = mosquitto_client_address(ed->client);
	const char *client_id = mosquitto_client_id(ed->client);
	/* an address, a client id (a provisioning one: "$provision/<128>/<128>") */
	char pair_key[2 * DEVICE_ID_MAX + 192], pair[2 * DEVICE_ID_MAX + 160];
	int64_t now = now_ms();
	bool counts, device;
	struct login login = {.gateway = false};

	(void)event;
	/* A device's login: the user name is its client id (anything else is refused
	 * without a key check). Service accounts are not throttled. */
	device = username != NULL && find_service(p, username) == NULL && client_id != NULL
		&& (!strcmp(client_id, username) || provisioning_login(username));
	snprintf(pair, sizeof(pair), "%s/%s", address ? address : "", client_id ? client_id : "");
	failure_key(pair_key, sizeof(pair_key), "pair", pair);
	/* Throttled: refused before any check (no database round trip, no HMAC). */
	if(device && throttled_for(p, pair_key, FAILURES_FREE_PER_PAIR, now)){
		p->throttled_total++;
		return MOSQ_ERR_AUTH;
	}
	reason = check_login(p, ed->client, username, ed->password, &counts, &login);
	if(reason != NULL){
		if(counts){
			p->refused_total++;
			if(device) record_failure(p, pair_key, FAILURES_FREE_PER_PAIR, now);
		}
		return refuse(ed->client, username, reason);
	}
	if(device) cache_del(&p->failures, pair_key);
	if(find_service(p, username) != NULL || provisioning_login(username)) return MOSQ_ERR_SUCCESS;
	kick_forget(p, username);
	if(p->track_sessions){
		struct cache_entry *session = cache_put(&p->sessions, username, login.credentials, now);
		if(session){
			session->client = ed->client;
			session->ca_tag = login.ca_tag;
			session->limits = login.limits;
			session->row.gateway = login.gateway;
		}
	}
	return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------------------ */
/* ACL                                                                                  */

/* The rest of the topic after "devices/{id}/", or NULL when it is not under it. */
static const char *own_rest(const char *topic, const char *id)
{
	size_t plen = sizeof(DEVICE_PREFIX) - 1, idlen = strlen(id);
	if(topic == NULL || strncmp(topic, DEVICE_PREFIX, plen) || strncmp(topic + plen, id, idlen)
			|| topic[plen + idlen] != '/'){
		return NULL;
	}
	return topic + plen + idlen + 1;
}

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);
	return n >= m && !strcmp(s + n - m, suffix);
}

/* Topics only the services write (the cloud's side of the contract): the desired twin,
 * method requests and cloud-to-device messages, of the device or one of its modules, and
 * the answers to the device's transfer requests. */
static bool service_topic(const char *rest)
{
	if(!strcmp(rest, "transfers/res")) return true;
	if(!strncmp(rest, "modules/", 8)){
		const char *slash = strchr(rest + 8, '/');
		if(slash == NULL) return false;
		rest = slash + 1;
	}
	return !strcmp(rest, "twin/desired") || !strcmp(rest, "c2d")
		|| (!strncmp(rest, "methods/", 8) && ends_with(rest, "/req"));
}

/* Why a device may not publish this under its own topics (NULL: it may). Only its
 * status is retained: a retained reading or patch would be handed again to every new
 * subscriber. */
static const char *publish_denied(const char *rest, bool retain)
{
	if(service_topic(rest)) return "a topic only the services write";
	if(retain && strcmp(rest, "status") != 0) return "retained (only status may be)";
	return NULL;
}

static void log_denied_publish(struct plugin *p, const char *username, const char *topic,
		const char *why)
{
	char shown_id[LOG_FIELD_MAX], shown_topic[LOG_FIELD_MAX];
	int64_t second = now_ms() / 1000;
	p->denied_total++;
	if(second != p->denied_log_second){
		p->denied_log_second = second;
		p->denied_logged = 0;
	}
	if(p->denied_logged++ >= DENIED_LOG_PER_SECOND) return; /* counted in the summary */
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			PLUGIN_NAME ": denied publish of device '%s' to '%s': %s",
			printable(username, shown_id, sizeof(shown_id)),
			printable(topic, shown_topic, sizeof(shown_topic)), why);
}

/* After a limits notification (or a reconnection), a batch per tick: the connected
 * devices' limits read again. A notification during a round starts another once it ends.
 * On an error they keep the limits they have, and a new round starts 10 s later. */
static void refresh_limits_step(struct plugin *p)
{
	char *literal, err[512];
	const char *params[1];
	size_t batch;
	PGresult *res;

	if(p->limits_round.ids == NULL){ /* a notification during a round waits for its end */
		if(!p->limits_stale || now_ms() < p->next_limits_ms) return;
		if(!round_start(&p->limits_round, &p->sessions)) return; /* still stale */
		p->limits_stale = false;
	}
	batch = round_batch(&p->limits_round);
	if(batch == 0) return;
	literal = text_array(p->limits_round.ids + p->limits_round.done, batch);
	if(literal == NULL) return;
	params[0] = literal;
	res = db_exec(p,
			"SELECT d.id, l.messages_per_second, l.burst_messages, l.bytes_per_second, "
			"l.burst_bytes FROM devices d LEFT JOIN LATERAL fleetline_limits_of(d.id, d.tags) l "
			"ON true WHERE d.id = ANY($1::text[])", 1, params, err, sizeof(err));
	mosquitto_free(literal);
	if(res == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": cannot read the limits of connected devices (kept; again in %d s): %s",
				BACKOFF_MAX_MS / 1000, err);
		round_free(&p->limits_round);
		p->limits_stale = true;
		p->next_limits_ms = now_ms() + BACKOFF_MAX_MS;
		return;
	}
	for(int row = 0; row < PQntuples(res); row++){
		struct cache_entry *e = cache_find(&p->sessions, PQgetvalue(res, row, 0));
		if(e == NULL) continue;
		read_limits(res, row, 1, &e->limits);
	}
	PQclear(res);
	p->limits_round.done += batch;
}

/* Takes one message of payloadlen bytes from the device's buckets. Over its limits:
 * an MQTT 5 device gets the publish refused (PUBACK "not authorized": the 2.0 plugin API
 * cannot answer 0x97, quota exceeded); an MQTT 3.1.1 device, which cannot be told in a
 * PUBACK, is disconnected before the PUBACK, so the message stays its own to send again.
 * Either way the refusal is counted for the device and logged. */
static int take_quota(struct plugin *p, struct mosquitto *client, const char *id,
		uint32_t payloadlen)
{
	const struct cache_entry *session = cache_find(&p->sessions, id);
	const struct limits *l = session ? &session->limits : NULL;
	struct cache_entry *e;
	struct bucket *b;
	int64_t now = now_ms();
	double elapsed;
	char shown[LOG_FIELD_MAX];

	if(l == NULL || l->messages_per_s <= 0) return MOSQ_ERR_SUCCESS;
	e = cache_find(&p->buckets, id);
	if(e == NULL){
		e = cache_put(&p->buckets, id, 0, now);
		if(e == NULL) return MOSQ_ERR_SUCCESS; /* no memory: not limited */
		e->bucket.messages = l->burst_messages;
		e->bucket.bytes = l->burst_bytes;
		e->bucket.at_ms = now;
	}
	b = &e->bucket;
	elapsed = (double)(now - b->at_ms) / 1000.0;
	b->messages += elapsed * l->messages_per_s;
	if(b->messages > l->burst_messages) b->messages = l->burst_messages;
	b->bytes += elapsed * l->bytes_per_s;
	if(b->bytes > l->burst_bytes) b->bytes = l->burst_bytes;
	b->at_ms = now;
	e->fetched_ms = now;
	if(b->messages >= 1.0 && b->bytes >= (double)payloadlen){
		b->messages -= 1.0;
		b->bytes -= (double)payloadlen;
		return MOSQ_ERR_SUCCESS;
	}
	b->refused_messages++;
	b->refused_bytes += payloadlen;
	p->limited_total++;
	if(now - b->logged_ms >= REFUSALS_LOG_MS || b->logged_ms == 0){
		b->logged_ms = now;
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				PLUGIN_NAME ": device '%s' is over its limits (%g messages/s, burst %g; %g bytes/s, "
				"burst %g): its publishes are refused and counted",
				printable(id, shown, sizeof(shown)), l->messages_per_s, l->burst_messages,
				l->bytes_per_s, l->burst_bytes);
	}
	return mosquitto_client_protocol_version(client) == 5 ? MOSQ_ERR_ACL_DENIED
		: MOSQ_ERR_ADMINISTRATIVE_ACTION;
}

/* Adds the refusals counted since the last time to device_limit_refusals. */
static void flush_refusals(struct plugin *p)
{
	char **ids, *id_array = NULL, *numbers[2] = {NULL, NULL}, err[512];
	size_t n = 0, at[2] = {1, 1}, size = p->buckets.count * 22 + 3;
	PGresult *res;

	if(!db_ready(p, 0)) return;
	ids = mosquitto_malloc((p->buckets.count + 1) * sizeof(*ids));
	numbers[0] = mosquitto_malloc(size);
	numbers[1] = mosquitto_malloc(size);
	if(ids == NULL || numbers[0] == NULL || numbers[1] == NULL) goto out;
	/* {n1,n2,...}: each number at most 20 digits and a comma */
	numbers[0][0] = numbers[1][0] = '{';
	for(size_t i = 0; i < p->buckets.nbuckets; i++){
		for(struct cache_entry *e = p->buckets.buckets[i]; e; e = e->next){
			if(e->bucket.refused_messages == 0) continue;
			ids[n] = e->id;
			at[0] += (size_t)snprintf(numbers[0] + at[0], size - at[0], "%s%" PRIu64,
					n ? "," : "", e->bucket.refused_messages);
			at[1] += (size_t)snprintf(numbers[1] + at[1], size - at[1], "%s%" PRIu64,
					n ? "," : "", e->bucket.refused_bytes);
			n++;
		}
	}
	if(n == 0) goto out;
	for(int k = 0; k < 2; k++){
		numbers[k][at[k]] = '}';
		numbers[k][at[k] + 1] = '\0';
	}
	id_array = text_array(ids, n);
	if(id_array == NULL) goto out;
	{
		const char *params[3] = {id_array, numbers[0], numbers[1]};
		res = db_exec(p,
				"INSERT INTO device_limit_refusals AS r (device_id, messages, bytes) "
				"SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) "
				"ON CONFLICT (device_id) DO UPDATE SET messages = r.messages + EXCLUDED.messages, "
				"bytes = r.bytes + EXCLUDED.bytes, last_refused_at = now()",
				3, params, err, sizeof(err));
	}
	if(res == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": cannot record refused publishes (kept for the next attempt): %s", err);
		goto out;
	}
	PQclear(res);
	for(size_t i = 0; i < p->buckets.nbuckets; i++){
		for(struct cache_entry *e = p->buckets.buckets[i]; e; e = e->next){
			e->bucket.refused_messages = e->bucket.refused_bytes = 0;
		}
	}
out:
	mosquitto_free(id_array);
	mosquitto_free(numbers[0]);
	mosquitto_free(numbers[1]);
	mosquitto_free(ids);
}

/* A bucket idle long enough to be full again, with nothing left to write down. */
static bool drop_idle_bucket(const struct cache_entry *e, void *arg)
{
	return e->bucket.refused_messages == 0 && *(const int64_t *)arg - e->fetched_ms >= 600000;
}

/* A provisioning client ("$provision/{enrollment}/{registration id}") may write
 * provisioning/{enrollment}/{registration id}/register and .../status, and read .../res;
 * nothing else (NULL: allowed). */
static const char *provisioning_denied(const char *identity,
		const struct mosquitto_evt_acl_check *ed)
{
	size_t plen = sizeof(PROVISIONING_TOPIC) - 1, ilen = strlen(identity);
	const char *topic = ed->topic, *verb;
	if(topic == NULL || strncmp(topic, PROVISIONING_TOPIC, plen)
			|| strncmp(topic + plen, identity, ilen) || topic[plen + ilen] != '/'){
		return "not its own provisioning topics";
	}
	verb = topic + plen + ilen + 1;
	if(ed->access == MOSQ_ACL_WRITE){
		if(ed->retain) return "retained";
		return !strcmp(verb, "register") || !strcmp(verb, "status") ? NULL
			: "provisioning clients write only register and status";
	}
	return !strcmp(verb, "res") ? NULL : "provisioning clients read only res";
}

/* ------------------------------------------------------------------------------------ */
/* Gateways: a device on its children's topics (docs/gateways.md)                       */

/* "devices/{id}/{rest}" -> rest, with {id} copied into id (NULL: not of that shape, or
 * an id longer than any device's). */
static const char *device_topic(const char *topic, char id[DEVICE_ID_MAX + 1])
{
	size_t plen = sizeof(DEVICE_PREFIX) - 1, n;
	const char *slash;
	if(topic == NULL || strncmp(topic, DEVICE_PREFIX, plen)) return NULL;
	slash = strchr(topic + plen, '/');
	if(slash == NULL) return NULL;
	n = (size_t)(slash - topic) - plen;
	if(n == 0 || n > DEVICE_ID_MAX) return NULL;
	memcpy(id, topic + plen, n);
	id[n] = '\0';
	return slash + 1;
}

/* A notification for the device (its parent changed, or its credentials, or it was
 * deleted): whatever was known of it as a child is asked again at its next use. */
static void forget_child(struct plugin *p, const char *id)
{
	cache_del(&p->children, id);
	cache_del(&p->refused_children, id);
}

/* Remembers for cache_ms that the gateway was refused the child, and why. */
static void remember_refusal(struct plugin *p, const char *gateway, const char *child,
		const char *why, int64_t now)
{
	size_t glen = strlen(gateway), wlen = strlen(why);
	struct cache_entry *r;
	if(cache_find(&p->refused_children, child) == NULL
			&& p->refused_children.count >= REFUSED_CHILDREN_MAX){
		return;
	}
	r = cache_put(&p->refused_children, child, 0, now);
	if(r == NULL) return;
	r->text = mosquitto_malloc(glen + wlen + 2);
	if(r->text == NULL){
		cache_del(&p->refused_children, child);
		return;
	}
	memcpy(r->text, gateway, glen + 1);
	memcpy(r->text + glen + 1, why, wlen + 1);
}

/* Whether a query's error is one that passes: a lock not had in time, a deadlock, a
 * conflict, a cancelled statement (others, like a missing function or grant, recur). */
static bool transient_sqlstate(const char *state)
{
	return !strcmp(state, "55P03") || !strcmp(state, "40P01") || !strcmp(state, "40001")
		|| !strcmp(state, "57014");
}

static const char *child_of(const char *child, const char *parent, const char *gateway,
		char *why, size_t whylen)
{
	if(!strcmp(parent, gateway)) return NULL;
	snprintf(why, whylen, "'%s' is a child of '%s'", child, parent);
	return why;
}

#define GATEWAY_CHILD_QUERY \
	"SELECT parent, refusal FROM fleetline_gateway_child($1, $2, $3::boolean)"

/* Why the gateway may not use the child's topics (NULL: it may). The registry is asked
 * (and may make an unknown id the gateway's child, by its policy, when may_create: a
 * publish or subscription, never a delivery) unless the child's parent was read during
 * this database connection, or the gateway was refused the id in the last cache_ms. A
 * lookup costs the gateway one message of its limits when `charge` is set
 * (subscriptions: publishes are charged before). *db_error: the registry could not be
 * asked, which is not the gateway's doing. */
static const char *child_denied(struct plugin *p, struct mosquitto *charge, bool may_create,
		const char *gateway, const char *child, char *why, size_t whylen, bool *db_error)
{
	struct cache_entry *e, *r;
	char err[512] = "no database connection";
	const char *params[3] = {gateway, child, may_create ? "t" : "f"};
	int64_t now = now_ms();
	PGresult *res = NULL;

	*db_error = false;
	if(!valid_device_id(child) || !strcmp(child, ".") || !strcmp(child, "..")){
		snprintf(why, whylen, "'%s' is not a valid device id", child);
		return why;
	}
	db_drain(p); /* a parent changed a moment ago counts now */
	e = cache_find(&p->children, child);
	if(e && e->version == p->connection_epoch && now - e->fetched_ms < p->stale_ms){
		return child_of(child, e->text, gateway, why, whylen);
	}
	r = cache_find(&p->refused_children, child);
	if(r && now - r->fetched_ms < p->cache_ms && !strcmp(r->text, gateway)){
		snprintf(why, whylen, "%s", r->text + strlen(r->text) + 1);
		return why;
	}
	if(charge != NULL && take_quota(p, charge, gateway, 0) != MOSQ_ERR_SUCCESS){
		snprintf(why, whylen, "over its limits");
		return why;
	}
	if(db_ready(p, 0)) res = db_exec(p, GATEWAY_CHILD_QUERY, 3, params, err, sizeof(err));
	if(res == NULL && p->conn != NULL && !p->connecting && p->sqlstate[0]
			&& !transient_sqlstate(p->sqlstate)){
		/* The registry answered with an error that will recur (a migration not applied,
		 * a grant missing): refused, not waited for. */
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": the registry cannot say whether a gateway may use a child's "
				"topics (refused): %s", err);
		snprintf(why, whylen, "the registry failed to answer (SQLSTATE %s)", p->sqlstate);
		remember_refusal(p, gateway, child, why, now);
		return why;
	}
	if(res == NULL || PQntuples(res) != 1){
		if(res) PQclear(res);
		e = cache_find(&p->children, child); /* looked up again: nothing is kept across a query */
		if(e && now - e->fetched_ms < p->stale_ms){ /* stale-if-error */
			return child_of(child, e->text, gateway, why, whylen);
		}
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": cannot ask the registry for the parent of a gateway's child: %s", err);
		*db_error = true;
		snprintf(why, whylen, "database unavailable");
		return why;
	}
	if(!PQgetisnull(res, 0, 0)
			&& (PQgetisnull(res, 0, 1) || strcmp(PQgetvalue(res, 0, 0), gateway) != 0)){
		/* A child, of this gateway (allowed) or of another (refused): kept while the
		 * connection lasts, each change notified. */
		const char *parent = PQgetvalue(res, 0, 0), *verdict;
		e = cache_put(&p->children, child, p->connection_epoch, now);
		if(e != NULL && (e->text = mosquitto_strdup(parent)) == NULL) cache_del(&p->children, child);
		verdict = child_of(child, parent, gateway, why, whylen);
		PQclear(res);
		return verdict;
	}
	/* Unknown and not created, without a parent, or disabled. */
	snprintf(why, whylen, "%s", PQgetisnull(res, 0, 1) ? "refused" : PQgetvalue(res, 0, 1));
	PQclear(res);
	remember_refusal(p, gateway, child, why, now);
	return why;
}

/* The longest prefix of s, at most max bytes, that ends on a UTF-8 character boundary. */
static size_t utf8_prefix(const char *s, size_t max)
{
	size_t n = strlen(s);
	if(n <= max) return n;
	while(max > 0 && ((unsigned char)s[max] & 0xC0) == 0x80) max--;
	return max;
}

/* Counts a refusal of the gateway for the child, with the latest reason and topic, for
 * the next flush (at most GATEWAY_REFUSALS_MAX pairs wait; the rest are only counted). */
static void record_gateway_refusal(struct plugin *p, const char *gateway, const char *child,
		const char *topic, const char *why)
{
	char key[CHILD_KEY_MAX], *text;
	struct cache_entry *e;
	size_t rlen = strlen(why), tlen = utf8_prefix(topic, 512);

	p->gateway_refused_total++;
	snprintf(key, sizeof(key), "%s/%s", gateway, child);
	e = cache_find(&p->gateway_refusals, key);
	if(e == NULL){
		if(p->gateway_refusals.count >= GATEWAY_REFUSALS_MAX
				|| (e = cache_put(&p->gateway_refusals, key, 0, now_ms())) == NULL){
			p->gateway_unrecorded++;
			return;
		}
	}
	text = mosquitto_malloc(rlen + tlen + 2);
	if(text != NULL){
		memcpy(text, why, rlen + 1);
		memcpy(text + rlen + 1, topic, tlen);
		text[rlen + 1 + tlen] = '\0';
		mosquitto_free(e->text);
		e->text = text;
	}
	if(e->text == NULL){
		cache_del(&p->gateway_refusals, key);
		p->gateway_unrecorded++;
		return;
	}
	e->bucket.refused_messages++;
}

/* Adds the gateways' refusals counted since the last time to gateway_refusals. */
static void flush_gateway_refusals(struct plugin *p)
{
	size_t n = p->gateway_refusals.count, k = 0, size = n * 22 + 3, at = 1;
	char **cols[4] = {NULL, NULL, NULL, NULL}, *literals[4] = {NULL, NULL, NULL, NULL};
	char *counts = NULL, err[512];
	PGresult *res = NULL;

	if(n == 0 || !db_ready(p, 0)) return;
	for(int c = 0; c < 4; c++){
		cols[c] = mosquitto_calloc(n, sizeof(char *));
		if(cols[c] == NULL) goto out;
	}
	counts = mosquitto_malloc(size);
	if(counts == NULL) goto out;
	counts[0] = '{';
	for(size_t i = 0; i < p->gateway_refusals.nbuckets; i++){
		for(struct cache_entry *e = p->gateway_refusals.buckets[i]; e; e = e->next){
			char *pair = mosquitto_strdup(e->id), *slash = pair ? strchr(pair, '/') : NULL;
			if(slash == NULL){
				mosquitto_free(pair);
				goto out;
			}
			*slash = '\0';
			cols[0][k] = pair; /* the gateway; the child follows it in the same block */
			cols[1][k] = slash + 1;
			cols[2][k] = e->text;
			cols[3][k] = e->text + strlen(e->text) + 1;
			at += (size_t)snprintf(counts + at, size - at, "%s%" PRIu64, k ? "," : "",
					e->bucket.refused_messages);
			k++;
		}
	}
	counts[at] = '}';
	counts[at + 1] = '\0';
	for(int c = 0; c < 4; c++){
		literals[c] = text_array(cols[c], k);
		if(literals[c] == NULL) goto out;
	}
	{
		const char *params[5] = {literals[0], literals[1], literals[2], literals[3], counts};
		res = db_exec(p,
				"INSERT INTO gateway_refusals AS r (gateway_id, child_id, reason, topic, count) "
				"SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) "
				"ON CONFLICT (gateway_id, child_id) DO UPDATE SET reason = EXCLUDED.reason, "
				"topic = EXCLUDED.topic, count = r.count + EXCLUDED.count, last_refused_at = now()",
				5, params, err, sizeof(err));
	}
	if(res == NULL){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": cannot record refusals of gateways (kept for the next attempt): %s", err);
		goto out;
	}
	PQclear(res);
	cache_sweep(&p->gateway_refusals, drop_any, NULL);
out:
	for(size_t i = 0; cols[0] && i < k; i++) mosquitto_free(cols[0][i]);
	for(int c = 0; c < 4; c++){
		mosquitto_free(cols[c]);
		mosquitto_free(literals[c]);
	}
	mosquitto_free(counts);
}

/* A device on the topics of another device, as a gateway for its child: allowed when
 * the registry says the child's parent is this device, with the rules of a device's own
 * topics. Refused publishes and subscriptions are recorded with the reason; deliveries
 * refused (a child moved away) are not. A publish the registry could not decide on
 * disconnects the gateway before its PUBACK: the message stays the gateway's to send
 * again (a refusal would be acknowledged, and the reading lost). */
static int child_topic_acl(struct plugin *p, const struct mosquitto_evt_acl_check *ed,
		const char *gateway, const char *child, const char *rest)
{
	char why_text[2 * DEVICE_ID_MAX + 96], shown_id[LOG_FIELD_MAX], shown_topic[LOG_FIELD_MAX];
	char shown_why[2 * DEVICE_ID_MAX + 96];
	const char *why;
	bool db_error;

	if(ed->access == MOSQ_ACL_WRITE){
		int rc;
		why = publish_denied(rest, ed->retain);
		if(why != NULL){
			log_denied_publish(p, gateway, ed->topic, why);
			return MOSQ_ERR_ACL_DENIED;
		}
		rc = take_quota(p, ed->client, gateway, ed->payloadlen);
		if(rc != MOSQ_ERR_SUCCESS) return rc;
	}
	why = child_denied(p, ed->access == MOSQ_ACL_SUBSCRIBE ? ed->client : NULL,
			ed->access != MOSQ_ACL_READ, gateway, child, why_text, sizeof(why_text), &db_error);
	if(why == NULL) return MOSQ_ERR_SUCCESS;
	if(ed->access == MOSQ_ACL_READ) return MOSQ_ERR_ACL_DENIED;
	if(db_error && ed->access == MOSQ_ACL_WRITE) return MOSQ_ERR_ADMINISTRATIVE_ACTION;
	if(!db_error) record_gateway_refusal(p, gateway, child, ed->topic, why);
	printable(why, shown_why, sizeof(shown_why)); /* it may hold the topic's text */
	if(ed->access == MOSQ_ACL_SUBSCRIBE){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				PLUGIN_NAME ": denied subscription of device '%s' to '%s': %s",
				printable(gateway, shown_id, sizeof(shown_id)),
				printable(ed->topic, shown_topic, sizeof(shown_topic)), shown_why);
	}else{
		log_denied_publish(p, gateway, ed->topic, shown_why);
	}
	return MOSQ_ERR_ACL_DENIED;
}

/* Whether the device logged in as a gateway (without session tracking: it may be, the
 * registry decides). */
static bool may_be_gateway(struct plugin *p, const char *id)
{
	const struct cache_entry *session;
	if(!p->track_sessions) return true;
	session = cache_find(&p->sessions, id);
	return session != NULL && session->row.gateway;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	struct plugin *p = userdata;
	const char *username = mosquitto_client_username(ed->client);
	const char *client_id = mosquitto_client_id(ed->client);
	const char *rest, *why;
	char shown_id[LOG_FIELD_MAX], shown_topic[LOG_FIELD_MAX], child[DEVICE_ID_MAX + 1];

	(void)event;
	if(username == NULL) return MOSQ_ERR_ACL_DENIED;
	if(find_service(p, username) != NULL) return MOSQ_ERR_SUCCESS;
	/* Unsubscribing only ever removes access. */
	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	if(provisioning_login(username)){
		why = provisioning_denied(username + sizeof(PROVISION_PREFIX) - 1, ed);
		if(why == NULL) return MOSQ_ERR_SUCCESS;
		log_denied_publish(p, username, ed->topic, why);
		return MOSQ_ERR_ACL_DENIED;
	}
	if(client_id == NULL || strcmp(client_id, username) != 0){
		rest = NULL;
	}else if((rest = own_rest(ed->topic, username)) == NULL && may_be_gateway(p, username)
			&& (rest = device_topic(ed->topic, child)) != NULL){
		return child_topic_acl(p, ed, username, child, rest);
	}
	if(rest != NULL){
		if(ed->access != MOSQ_ACL_WRITE) return MOSQ_ERR_SUCCESS;
		why = publish_denied(rest, ed->retain);
		if(why == NULL) return take_quota(p, ed->client, username, ed->payloadlen);
		log_denied_publish(p, username, ed->topic, why);
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_SUBSCRIBE){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				PLUGIN_NAME ": denied subscription of device '%s' to '%s'",
				printable(username, shown_id, sizeof(shown_id)),
				printable(ed->topic, shown_topic, sizeof(shown_topic)));
	}else if(ed->access == MOSQ_ACL_WRITE){
		log_denied_publish(p, username, ed->topic, "not under its own devices/<id>/");
	}
	return MOSQ_ERR_ACL_DENIED;
}

/* ------------------------------------------------------------------------------------ */
/* Tick and reload                                                                      */

static bool drop_expired(const struct cache_entry *e, void *arg)
{
	const struct plugin *p = arg;
	int64_t age = now_ms() - e->fetched_ms;
	/* Only a known device is worth keeping for stale-if-error. */
	return e->row.known ? age >= p->stale_ms : age >= p->cache_ms;
}

static bool drop_old_failure(const struct cache_entry *e, void *arg)
{
	return *(const int64_t *)arg - e->fetched_ms >= FAILURES_FORGET_MS;
}

static bool drop_old_child(const struct cache_entry *e, void *arg)
{
	const struct plugin *p = arg;
	return now_ms() - e->fetched_ms >= p->stale_ms;
}

static bool drop_old_refused_child(const struct cache_entry *e, void *arg)
{
	const struct plugin *p = arg;
	return now_ms() - e->fetched_ms >= p->cache_ms;
}

/* Refused and throttled logins and denied publishes since the last report, once a
 * minute when any happened (the totals since the broker started beside them). */
static void report_counts(struct plugin *p)
{
	if(p->gateway_refused_total != p->gateway_refused_reported){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				PLUGIN_NAME ": in the last minute %" PRIu64 " refusals of gateways for devices not "
				"their children (since start: %" PRIu64 "; %" PRIu64 " not recorded)",
				p->gateway_refused_total - p->gateway_refused_reported, p->gateway_refused_total,
				p->gateway_unrecorded);
		p->gateway_refused_reported = p->gateway_refused_total;
	}
	if(p->refused_total == p->refused_reported && p->throttled_total == p->throttled_reported
			&& p->denied_total == p->denied_reported && p->limited_total == p->limited_reported){
		return;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			PLUGIN_NAME ": in the last minute %" PRIu64 " refused logins, %" PRIu64
			" throttled, %" PRIu64 " denied device publishes, %" PRIu64 " over devices' limits "
			"(since start: %" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64 "; %zu client ids or "
			"addresses with recent failures)",
			p->refused_total - p->refused_reported, p->throttled_total - p->throttled_reported,
			p->denied_total - p->denied_reported, p->limited_total - p->limited_reported,
			p->refused_total, p->throttled_total, p->denied_total, p->limited_total,
			p->failures.count);
	p->limited_reported = p->limited_total;
	p->refused_reported = p->refused_total;
	p->throttled_reported = p->throttled_total;
	p->denied_reported = p->denied_total;
}

/* A connection ends (also a refused login, or one replaced by a newer connection with
 * the same client id: only the entry of this very connection goes). */
static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	struct plugin *p = userdata;
	const char *id = mosquitto_client_id(ed->client);
	const struct cache_entry *e;

	(void)event;
	if(id == NULL) return MOSQ_ERR_SUCCESS;
	e = cache_find(&p->sessions, id);
	if(e && e->client == ed->client) cache_del(&p->sessions, id);
	return MOSQ_ERR_SUCCESS;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	struct plugin *p = userdata;
	int64_t now = now_ms();

	(void)event;
	(void)event_data; /* now_s/now_ns are not filled in by 2.0.11 */
	if(now >= p->next_drain_ms){
		p->next_drain_ms = now + DRAIN_INTERVAL_MS;
		/* keeps LISTENing: reconnects (honouring the backoff) without waiting */
		if(db_ready(p, 0)){
			db_drain(p);
			if(p->reconnected || p->recheck.ids) recheck_step(p);
			load_cas(p);
			if(p->limits_stale || p->limits_round.ids) refresh_limits_step(p);
		}
	}
	if(p->nkicks) kick_run(p);
	if(now >= p->next_refusals_flush_ms){
		p->next_refusals_flush_ms = now + REFUSALS_FLUSH_MS;
		flush_refusals(p);
		flush_gateway_refusals(p);
	}
	if(now >= p->next_prune_ms){
		p->next_prune_ms = now + PRUNE_INTERVAL_MS;
		cache_sweep(&p->cache, drop_expired, p);
		cache_sweep(&p->failures, drop_old_failure, &now);
		cache_sweep(&p->buckets, drop_idle_bucket, &now);
		cache_sweep(&p->children, drop_old_child, p);
		cache_sweep(&p->refused_children, drop_old_refused_child, p);
	}
	if(now >= p->next_summary_ms){
		p->next_summary_ms = now + SUMMARY_INTERVAL_MS;
		report_counts(p);
	}
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_reload *ed = event_data;
	struct plugin *p = userdata;
	struct services fresh;
	const char *path = option(ed->options, ed->option_count, "services_file");

	(void)event;
	if(path && strcmp(path, p->services_path) != 0){
		char *copy = mosquitto_strdup(path);
		if(copy){
			mosquitto_free(p->services_path);
			p->services_path = copy;
		}
	}
	if(services_load(p->services_path, &fresh)){
		services_free(&p->services);
		p->services = fresh;
		mosquitto_log_printf(MOSQ_LOG_NOTICE, PLUGIN_NAME ": reloaded %zu service account(s)",
				p->services.count);
	}else{
		mosquitto_log_printf(MOSQ_LOG_ERR,
				PLUGIN_NAME ": keeping the previous %zu service account(s)", p->services.count);
	}
	return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------------------ */
/* Plugin entry points                                                                  */

static void plugin_free(struct plugin *p)
{
	if(p == NULL) return;
	db_drop(p);
	cache_free(&p->cache);
	cache_free(&p->sessions);
	cache_free(&p->failures);
	cache_free(&p->buckets);
	cache_free(&p->children);
	cache_free(&p->refused_children);
	cache_free(&p->gateway_refusals);
	round_free(&p->limits_round);
	cas_free(p->cas, p->ncas);
	round_free(&p->recheck);
	for(size_t i = 0; i < p->nkicks; i++) mosquitto_free(p->kicks[i]);
	mosquitto_free(p->kicks);
	services_free(&p->services);
	if(p->secret){
		OPENSSL_cleanse(p->secret, p->secret_len);
		mosquitto_free(p->secret);
	}
	mosquitto_free(p->conninfo);
	mosquitto_free(p->services_path);
	mosquitto_free(p);
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static int init_fail(struct plugin *p, const char *what)
{
	mosquitto_log_printf(MOSQ_LOG_ERR, PLUGIN_NAME ": %s", what);
	plugin_free(p);
	return MOSQ_ERR_INVAL;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	struct plugin *p = mosquitto_calloc(1, sizeof(*p));
	const char *database = option(options, option_count, "database");
	const char *secret_file = option(options, option_count, "key_secret_file");
	const char *services_file = option(options, option_count, "services_file");
	const char *cache_seconds = option(options, option_count, "cache_seconds");
	const char *stale_seconds = option(options, option_count, "stale_seconds");
	const char *max_token_seconds = option(options, option_count, "max_token_seconds");
	char err[512], msg[640];
	int64_t seconds;
	int rc;

	if(p == NULL) return MOSQ_ERR_NOMEM;
	p->pid = identifier;
	p->cache_ms = DEFAULT_CACHE_SECONDS * 1000;
	p->stale_ms = DEFAULT_STALE_SECONDS * 1000;
	p->max_token_s = DEFAULT_MAX_TOKEN_SECONDS;
	p->backoff_ms = BACKOFF_MIN_MS;
	p->ssl_index = -1;
	p->cas_stale = true;

	if(database == NULL || !*database){
		return init_fail(p, "plugin_opt_database is required (a libpq conninfo or URL)");
	}
	if(secret_file == NULL || !*secret_file){
		return init_fail(p, "plugin_opt_key_secret_file is required");
	}
	if(services_file == NULL || !*services_file){
		return init_fail(p, "plugin_opt_services_file is required");
	}
	if(cache_seconds){
		if(!parse_seconds(cache_seconds, &seconds)){
			return init_fail(p, "plugin_opt_cache_seconds must be a number of seconds");
		}
		p->cache_ms = seconds * 1000;
	}
	if(stale_seconds){
		if(!parse_seconds(stale_seconds, &seconds)){
			return init_fail(p, "plugin_opt_stale_seconds must be a number of seconds");
		}
		p->stale_ms = seconds * 1000;
	}
	if(max_token_seconds){
		if(!parse_seconds_max(max_token_seconds, &seconds, 86400LL * 3660) || seconds < 1){
			return init_fail(p, "plugin_opt_max_token_seconds must be a number of seconds");
		}
		p->max_token_s = seconds;
	}
	p->conninfo = mosquitto_strdup(database);
	p->services_path = mosquitto_strdup(services_file);
	if(p->conninfo == NULL || p->services_path == NULL || !cache_init(&p->cache)
			|| !cache_init(&p->sessions) || !cache_init(&p->failures)
			|| !cache_init(&p->buckets) || !cache_init(&p->children)
			|| !cache_init(&p->refused_children) || !cache_init(&p->gateway_refusals)){
		return init_fail(p, "out of memory");
	}

	p->secret = read_file(secret_file, &p->secret_len, err, sizeof(err));
	if(p->secret == NULL){
		snprintf(msg, sizeof(msg), "plugin_opt_key_secret_file: %s", err);
		return init_fail(p, msg);
	}
	if(p->secret_len < MIN_SECRET_BYTES){
		snprintf(msg, sizeof(msg),
				"plugin_opt_key_secret_file: %s holds %zu bytes; the secret needs at least %d",
				secret_file, p->secret_len, MIN_SECRET_BYTES);
		return init_fail(p, msg);
	}
	if(p->secret[p->secret_len - 1] == '\n'){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": %s ends with a newline, which is part of the secret (keys derived "
				"from the secret without it will not match)", secret_file);
	}
	if(!services_load(p->services_path, &p->services)){
		return init_fail(p, "plugin_opt_services_file: cannot load the service accounts");
	}

	rc = mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, p);
	if(rc == MOSQ_ERR_SUCCESS){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, p);
	}
	if(rc == MOSQ_ERR_SUCCESS){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_RELOAD, on_reload, NULL, p);
	}
	if(rc != MOSQ_ERR_SUCCESS){
		mosquitto_callback_unregister(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
		mosquitto_callback_unregister(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
		snprintf(msg, sizeof(msg), "cannot register callbacks (error %d)", rc);
		return init_fail(p, msg);
	}
	/* Disconnecting devices whose key changed needs both; 2.0.11 calls tick callbacks
	 * only with per_listener_settings false. */
	p->tick_registered =
		mosquitto_callback_register(identifier, MOSQ_EVT_TICK, on_tick, NULL, p) == MOSQ_ERR_SUCCESS;
	p->disconnect_registered = mosquitto_callback_register(identifier, MOSQ_EVT_DISCONNECT,
			on_disconnect, NULL, p) == MOSQ_ERR_SUCCESS;
	p->track_sessions = p->tick_registered && p->disconnect_registered;
	/* Client certificates: every server-side TLS connection made from now on asks for
	 * one (on_ssl_new). */
	p->ssl_index = SSL_get_ex_new_index(0, NULL, on_ssl_new, NULL, NULL);
	if(p->ssl_index < 0){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": cannot hook TLS connections: devices cannot log in with certificates");
	}
	if(!p->track_sessions){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				PLUGIN_NAME ": no tick or disconnect event: devices whose key changes stay "
				"connected until they reconnect");
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			PLUGIN_NAME ": ready; %zu service account(s), credentials cached %" PRId64 " s "
			"(stale-if-error %" PRId64 " s), tokens valid %" PRId64 " s at most",
			p->services.count, p->cache_ms / 1000, p->stale_ms / 1000, p->max_token_s);
	*userdata = p;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct plugin *p = userdata;
	(void)options;
	(void)option_count;
	if(p == NULL) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(p->pid, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(p->pid, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(p->pid, MOSQ_EVT_RELOAD, on_reload, NULL);
	if(p->tick_registered){
		mosquitto_callback_unregister(p->pid, MOSQ_EVT_TICK, on_tick, NULL);
	}
	if(p->disconnect_registered){
		mosquitto_callback_unregister(p->pid, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	}
	if(p->ssl_index >= 0) CRYPTO_free_ex_index(CRYPTO_EX_INDEX_SSL, p->ssl_index);
	flush_refusals(p); /* what was counted since the last tick */
	plugin_free(p);
	return MOSQ_ERR_SUCCESS;
}
