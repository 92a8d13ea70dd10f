/* The playground: a form built from the server's catalog (GET /api/fluxserve/catalog: the path
   table and the registry), a mask painted on a canvas, progress followed on the job's event
   stream, the images with their meta and seeds, the same request as curl and Python, and the
   key's history (GET /api/fluxserve/jobs). */
'use strict';

(() => {
  const {el} = FS;
  const $ = (id) => document.getElementById(id);
  const form = $('gen');
  const fields = ['task', 'model', 'endpoint', 'prompt', 'negative_prompt', 'width', 'height', 'samples', 'steps',
                  'guidance', 'seed', 'strength'];
  const input = Object.fromEntries(fields.map((name) => [name, $(name)]));
  const state = {catalog: null, init: '', second: '', follow: null, jobId: null, fetchPath: null};

  // -- the catalog: tasks -> models -> endpoints -------------------------------------------------
  const models = () => (state.catalog ? state.catalog.models : []);
  const paths = () => (state.catalog ? state.catalog.paths : []);
  const currentModel = () => models().find((m) => m.name === input.model.value);
  const currentPath = () => paths().find((p) => p.path === input.endpoint.value);

  async function loadCatalog() {
    const answer = await FS.api('/api/fluxserve/catalog');
    if (!answer.ok || !answer.data) {
      setStatus(`Could not load the catalog: ${(answer.data && answer.data.message) || answer.status}`, 'bad');
      return;
    }
    state.catalog = answer.data;
    const served = new Set(paths().map((p) => p.task));
    input.task.replaceChildren(...state.catalog.tasks.filter((t) => served.has(t.task))
      .map((t) => el('option', {value: t.task}, t.words)));
    fillModels();
  }

  function fillModels() {
    const task = input.task.value;
    const previous = input.model.value;
    const able = models().filter((m) => m.tasks.includes(task) && paths().some((p) => p.task === task && p.models.includes(m.name)));
    input.model.replaceChildren(...able.map((m) => el('option', {value: m.name}, m.name)));
    if (able.some((m) => m.name === previous)) input.model.value = previous;
    fillEndpoints();
    applyModelDefaults();
  }

  function fillEndpoints() {
    const task = input.task.value;
    const model = input.model.value;
    const serving = paths().filter((p) => p.task === task && p.models.includes(model));
    // a path dedicated to the model first, then those whose default it is, then any taking model_id
    const rank = (p) => (p.model === model ? 0 : p.default_model === model ? 1 : 2);
    serving.sort((a, b) => rank(a) - rank(b));
    input.endpoint.replaceChildren(...serving.map((p) => el('option', {value: p.path},
      p.takes_model_id ? `${p.path}  (model_id)` : p.path)));
    applyPath();
  }

  function applyModelDefaults() {
    const model = currentModel();
    if (!model) return;
    input.steps.value = model.steps;
    input.guidance.value = model.guidance;
    input.strength.value = model.strength;
    const task = input.task.value;
    $('negative-row').hidden = !model.negative_prompt;
    $('images').hidden = task === 'text2img';
    $('second').hidden = !(model.second_image && task !== 'text2img');
    $('mask-editor').hidden = task !== 'inpaint';
    updateCode();
  }

  function applyPath() {
    const path = currentPath();
    if (!path) return;
    for (const side of [input.width, input.height]) {
      side.min = path.min_side;
      side.max = path.max_side;
      side.step = path.side_multiple;
    }
    $('endpoint-path').textContent = `POST ${path.path}`;
    updateCode();
  }

  input.task.addEventListener('change', fillModels);
  input.model.addEventListener('change', () => { fillEndpoints(); applyModelDefaults(); });
  input.endpoint.addEventListener('change', applyPath);

  // -- images: upload (a data: URI) or URL ---------------------------------------------------------
  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function setImage(which, value) {
    state[which] = value;
    const preview = $(`${which}-preview`);
    preview.hidden = !value;
    if (value) preview.src = value; else preview.removeAttribute('src');
    if (which === 'init') setMaskBase(value);
    updateCode();
  }

  for (const which of ['init', 'second']) {
    $(`${which}-file`).addEventListener('change', async (event) => {
      const file = event.target.files[0];
      if (!file) return;
      $(`${which}-url`).value = '';
      setImage(which, await readFile(file));
    });
    $(`${which}-url`).addEventListener('change', (event) => {
      const url = event.target.value.trim();
      if (url) $(`${which}-file`).value = '';
      setImage(which, url);
    });
  }

  // -- the mask: painted on a canvas over the init image, sent as a black/white PNG --------------------
  const canvas = $('mask-canvas');
  const ctx = canvas.getContext('2d');
  const base = $('mask-base');
  let painting = false;
  let last = null;
  let painted = false;

  function setMaskBase(src) {
    $('mask-stage').hidden = !src;
    $('mask-hint').textContent = src ? 'Paint over what should be repainted; the rest is kept.'
      : 'Choose an init image first, then paint over it. Painted: repainted; the rest is kept.';
    if (src) base.src = src; else base.removeAttribute('src');
  }

  base.addEventListener('load', () => {
    if (canvas.width !== base.naturalWidth || canvas.height !== base.naturalHeight) {
      canvas.width = base.naturalWidth;
      canvas.height = base.naturalHeight;
      painted = false;
    }
  });
  base.addEventListener('error', () => {
    $('mask-hint').textContent = 'This browser could not load the image (the server may still fetch it); the mask uses width × height.';
    $('mask-stage').hidden = true;
  });

  function point(event) {
    const box = canvas.getBoundingClientRect();
    return {x: (event.clientX - box.left) * canvas.width / box.width, y: (event.clientY - box.top) * canvas.height / box.height,
            scale: canvas.width / box.width};
  }

  function stroke(from, to) {
    ctx.strokeStyle = '#ff3b6b';
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    ctx.lineWidth = Number($('brush').value) * to.scale;
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    painted = true;
  }

  canvas.addEventListener('pointerdown', (event) => {
    event.preventDefault();
    painting = true;
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, last);
  });
  canvas.addEventListener('pointermove', (event) => {
    if (!painting) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  for (const end of ['pointerup', 'pointercancel']) {
    canvas.addEventListener(end, () => {
      if (painting) updateCode();
      painting = false;
    });
  }
  $('mask-clear').addEventListener('click', () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    painted = false;
    updateCode();
  });

  /** White where painted, black elsewhere, at the init image's size (the server resizes it anyway). */
  function maskDataUrl() {
    const out = document.createElement('canvas');
    out.width = canvas.width;
    out.height = canvas.height;
    const c = out.getContext('2d');
    c.drawImage(canvas, 0, 0);
    c.globalCompositeOperation = 'source-in';
    c.fillStyle = '#fff';
    c.fillRect(0, 0, out.width, out.height);
    c.globalCompositeOperation = 'destination-over';
    c.fillStyle = '#000';
    c.fillRect(0, 0, out.width, out.height);
    return out.toDataURL('image/png');
  }

  // -- the request ----------------------------------------------------------------------------------
  function number(field) {
    const raw = input[field].value.trim();
    if (raw === '') return undefined;
    const value = Number(raw);
    return Number.isFinite(value) ? value : raw; // the server answers a clear 400 for a bad value
  }

  /** The body as the playground sends it (without instant_response) and as the copies show it. */
  function buildBody() {
    const path = currentPath();
    const model = currentModel();
    if (!path || !model) return null;
    const body = {prompt: input.prompt.value.trim()};
    if (path.takes_model_id) body.model_id = model.name;
    const negative = input.negative_prompt.value.trim();
    if (negative && model.negative_prompt) body.negative_prompt = negative;
    body.width = number('width');
    body.height = number('height');
    body.samples = number('samples');
    body.num_inference_steps = number('steps');
    body.guidance_scale = number('guidance');
    body.seed = number('seed');
    if (path.task !== 'text2img') {
      body.init_image = state.init || undefined;
      if (model.second_image && state.second) body.init_image_2 = state.second;
      body.strength = number('strength');
    }
    if (path.task === 'inpaint') body.mask_image = painted ? maskDataUrl() : undefined;
    for (const name of Object.keys(body)) if (body[name] === undefined) delete body[name];
    return body;
  }

  function problem(body) {
    if (!body) return 'The catalog is not loaded yet.';
    if (!body.prompt) return 'Write a prompt.';
    const task = currentPath().task;
    if (task !== 'text2img' && !body.init_image) return 'Choose an init image (a file or a URL).';
    if (task === 'inpaint' && !body.mask_image) return 'Paint the mask over the image: what you paint is repainted.';
    return null;
  }

  // -- the copies: curl and modelslab-py -------------------------------------------------------------
  const shorten = (value) => (typeof value === 'string' && value.startsWith('data:') && value.length > 120
    ? `${value.slice(0, 40)}…(${Math.round(value.length / 1024)} kB, shortened on screen)` : value);
  const shortened = (body) => Object.fromEntries(Object.entries(body).map(([k, v]) => [k, shorten(v)]));

  function curlText(body) {
    const json = JSON.stringify(body).replace(/'/g, "'\\''");
    return `curl -s ${location.origin}${currentPath().path} -H 'Content-Type: application/json' -H "Key: $KEY" \\\n  -d '${json}'`;
  }

  function pyLiteral(value, indent) {
    const pad = ' '.repeat(indent);
    if (value === null || value === undefined) return 'None';
    if (value === true) return 'True';
    if (value === false) return 'False';
    if (typeof value === 'number' || typeof value === 'string') return JSON.stringify(value);
    if (Array.isArray(value)) return `[${value.map((v) => pyLiteral(v, indent)).join(', ')}]`;
    const items = Object.entries(value).map(([k, v]) => `${pad}    ${JSON.stringify(k)}: ${pyLiteral(v, indent + 4)},`);
    return `{\n${items.join('\n')}\n${pad}}`;
  }

  function pythonText(body) {
    const endpoint = currentPath().path.replace(/^\/api\//, '');
    return [
      'import os',
      'import time',
      '',
      'from modelslab_py.core.client import Client',
      '',
      'client = Client(api_key=os.environ["KEY"])',
      `client.base_url = ${JSON.stringify(`${location.origin}/api/`)}`,
      `result = client.post(client.base_url + ${JSON.stringify(endpoint)}, data=${pyLiteral(body, 0)})`,
      'while result["status"] == "processing":  # still queued or generating when the wait ended',
      '    time.sleep(2)',
      '    result = client.post(result["fetch_result"])',
      'print(result["status"], result.get("output") or result.get("message"))',
    ].join('\n');
  }

  let codeTimer = null;
  function updateCode() {
    clearTimeout(codeTimer);
    codeTimer = setTimeout(() => {
      const body = buildBody();
      if (!body) return;
      $('code-curl').textContent = curlText(shortened(body));
      $('code-python').textContent = pythonText(shortened(body));
    }, 120);
  }
  form.addEventListener('input', updateCode);
  form.addEventListener('change', updateCode);
  $('copy-curl').addEventListener('click', (event) => { const b = buildBody(); if (b) FS.copy(curlText(b), event.target); });
  $('copy-python').addEventListener('click', (event) => { const b = buildBody(); if (b) FS.copy(pythonText(b), event.target); });

  // -- results ----------------------------------------------------------------------------------------
  function setStatus(text, kind) {
    const status = $('status');
    status.textContent = text;
    status.className = `status ${kind || ''}`;
  }

  function logEvent(name, detail) {
    const list = $('events');
    list.append(el('li', {dataset: {event: name}}, detail ? `${name} ${detail}` : name));
    while (list.children.length > 60) list.firstElementChild.remove();
    list.scrollTop = list.scrollHeight;
  }

  function resetResult() {
    $('events').replaceChildren();
    $('gallery').replaceChildren();
    $('meta-box').hidden = true;
    $('progress').hidden = true;
  }

  const displayMeta = (meta) => JSON.stringify(meta, (k, v) => shorten(v), 2);

  function useSeed(seed, button) {
    input.seed.value = seed;
    input.seed.dispatchEvent(new Event('input', {bubbles: true}));
    button.textContent = `Seed ${seed} in the form`;
    setTimeout(() => { button.textContent = 'Use seed'; }, 1500);
  }

  function showAnswer(answer) {
    $('progress').hidden = true;
    $('cancel').hidden = true;
    if (!answer || typeof answer !== 'object') return;
    if (answer.status === 'success') {
      const links = (answer.proxy_links && answer.proxy_links.length ? answer.proxy_links : answer.output) || [];
      const meta = answer.meta || {};
      const seeds = meta.seeds || [meta.seed];
      setStatus(answer.message || `Request ${answer.id}: ${links.length} image(s) in ${answer.generationTime} s`,
                answer.message ? 'bad' : 'good');
      $('gallery').replaceChildren(...links.map((link, i) => {
        const button = el('button', {type: 'button', class: 'use-seed', dataset: {seed: seeds[i]}}, 'Use seed');
        button.addEventListener('click', () => useSeed(seeds[i], button));
        return el('figure', {dataset: {seed: seeds[i]}},
          el('a', {href: link, target: '_blank', rel: 'noopener'}, el('img', {src: link, alt: `seed ${seeds[i]}`})),
          el('figcaption', {}, el('span', {class: 'seed'}, `seed ${seeds[i]}`), button));
      }));
      $('meta').textContent = displayMeta(meta);
      $('meta-summary').textContent = [meta.model_id, `${meta.width}×${meta.height}`, `${meta.num_inference_steps} steps`,
        `guidance ${meta.guidance_scale}`, meta.strength !== undefined ? `strength ${meta.strength}` : null,
        `seeds ${seeds.join(', ')}`].filter(Boolean).join(' · ');
      $('meta-box').hidden = false;
    } else if (answer.status === 'failed') {
      setStatus(`Request ${answer.id} failed: ${answer.message}`, 'bad');
    } else if (answer.status === 'processing') {
      setStatus(`Request ${answer.id} is still processing.`);
    } else {
      setStatus(answer.message || 'Something went wrong.', 'bad');
    }
  }

  async function pollFetch(id) {
    for (let tries = 0; tries < 600; tries++) {
      const answer = await FS.api(state.fetchPath.replace('{id}', id), {method: 'POST', body: {}});
      if (answer.data && answer.data.status !== 'processing') return answer.data;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
    return null;
  }

  async function follow(id) {
    if (state.follow) state.follow.abort();
    const controller = new AbortController();
    state.follow = controller;
    state.jobId = id;
    let done = null;
    $('progress').hidden = false;
    $('progress').removeAttribute('value');
    try {
      await FS.events(`/api/fluxserve/jobs/${id}/events`, (name, data) => {
        let payload = null;
        try { payload = JSON.parse(data); } catch (e) { payload = null; }
        if (!payload) return;
        if (name === 'queued') {
          logEvent('queued', `#${payload.position}`);
          setStatus(`Request ${id} queued: position ${payload.position}${payload.eta ? `, about ${payload.eta} s` : ''}`);
          $('cancel').hidden = false;
        } else if (name === 'progress') {
          $('cancel').hidden = true;
          logEvent('progress', payload.total ? `${payload.step}/${payload.total}` : 'started');
          if (payload.total) {
            $('progress').max = payload.total;
            $('progress').value = payload.step;
            setStatus(`Request ${id} generating: step ${payload.step} of ${payload.total}`);
          } else {
            setStatus(`Request ${id} generating`);
          }
        } else if (name === 'done') {
          logEvent('done', payload.status);
          done = payload;
        }
      }, controller.signal);
    } catch (error) {
      if (controller.signal.aborted) return;
      logEvent('stream-error', error.message);
    }
    if (controller.signal.aborted) return;
    if (!done) done = await pollFetch(id); // the stream broke off: ask the fetch route instead
    if (state.jobId === id) showAnswer(done);
    loadHistory();
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!FS.key()) {
      setStatus('Enter your API key first (top right): it is kept in this browser.', 'bad');
      $('key').focus();
      return;
    }
    const body = buildBody();
    const wrong = problem(body);
    if (wrong) {
      setStatus(wrong, 'bad');
      return;
    }
    const path = currentPath();
    state.fetchPath = path.fetch;
    if (state.follow) state.follow.abort();
    resetResult();
    setStatus('Sending…');
    const generate = $('generate');
    generate.disabled = true;
    let answer;
    try {
      // one Idempotency-Key per click: a retried send can never queue the request twice
      answer = await FS.api(path.path, {method: 'POST', body: {...body, instant_response: true},
                                        headers: {'Idempotency-Key': FS.uuid()}});
    } catch (error) {
      setStatus(`Could not reach the server: ${error.message}`, 'bad');
      return;
    } finally {
      generate.disabled = false;
    }
    const data = answer.data || {};
    if (!answer.ok || data.status === 'error') {
      const retry = data.retry_after ? ` (retry in ${data.retry_after} s)` : '';
      setStatus(`${answer.status}: ${data.message || 'refused'}${retry}`, 'bad');
      return;
    }
    logEvent('accepted', `#${data.id}`);
    if (data.status === 'processing') follow(data.id);
    else {
      showAnswer(data);
      loadHistory();
    }
  });

  $('cancel').addEventListener('click', async () => {
    if (!state.jobId) return;
    const answer = await FS.api(`/api/fluxserve/jobs/${state.jobId}/cancel`, {method: 'POST', body: {}});
    logEvent('cancel', answer.ok ? 'ok' : (answer.data && answer.data.message) || answer.status);
  });

  // -- history ----------------------------------------------------------------------------------------
  async function loadHistory() {
    const list = $('history');
    const note = $('history-note');
    if (!FS.key()) {
      list.replaceChildren();
      note.textContent = 'Your recent requests appear here once your key is saved.';
      return;
    }
    const answer = await FS.api('/api/fluxserve/jobs?limit=20');
    if (!answer.ok || !answer.data) {
      note.textContent = `History unavailable: ${(answer.data && answer.data.message) || answer.status}`;
      return;
    }
    const jobs = answer.data.jobs;
    note.textContent = jobs.length ? '' : 'No requests yet with this key.';
    list.replaceChildren(...jobs.map((job) => {
      const reply = job.answer || {};
      const meta = reply.meta || {};
      const links = reply.proxy_links || [];
      const show = el('button', {type: 'button'}, 'Show');
      show.addEventListener('click', () => {
        resetResult();
        state.fetchPath = paths().length ? paths()[0].fetch : state.fetchPath;
        if (reply.status === 'processing') follow(job.id); else showAnswer(reply);
        $('result').scrollIntoView({behavior: 'smooth', block: 'start'});
      });
      return el('li', {dataset: {id: job.id}},
        el('div', {}, el('strong', {}, `#${job.id} `), el('span', {class: `pill ${job.state}`}, job.state), ` ${job.model} · ${job.task}`),
        meta.prompt ? el('div', {class: 'prompt', title: meta.prompt}, meta.prompt) : null,
        reply.status === 'failed' ? el('div', {class: 'muted'}, reply.message) : null,
        links.length ? el('div', {class: 'thumbs'}, links.map((link, i) => el('img', {src: link, alt: `seed ${(meta.seeds || [])[i]}`, loading: 'lazy'}))) : null,
        el('div', {class: 'muted'}, FS.when(job.created_at), meta.seed !== undefined ? ` · seed ${meta.seed}` : ''),
        el('div', {}, show));
    }));
  }
  $('history-refresh').addEventListener('click', loadHistory);

  FS.setupKeyForm(loadHistory);
  loadCatalog().then(loadHistory);
})();
